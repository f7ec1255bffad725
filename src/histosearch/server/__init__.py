"""The search service and web viewer behind `histosearch serve`."""
