"""Self-supervised training of domain encoders: spatial-continuity siamese and BYOL."""
