"""`histosearch encoders`: every encoder, its licence and where its weights are (no torch)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from histosearch.cli.common import console


def encoders_command(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list on stdout.")] = False,
) -> None:
    """List the encoders: dimension, input, licence, gating, and whether their weights are on
    this machine (where found, or where they would be looked up)."""
    from histosearch.encoders.catalog import (
        BUILTINS,
        MODELS,
        hub_cache_dir,
        locate_weights,
        weights_home,
    )
    from histosearch.encoders.names import builtin_weights

    rows = []
    for info in BUILTINS:
        found = builtin_weights(info.name)
        rows.append(
            {
                "name": info.name,
                "kind": "built-in",
                "dim": info.dim,
                "input": info.input_size,
                "licence": info.licence,
                "gated": False,
                "hub": None,
                "params": None,
                "precision": "float32",
                "weights_found": found is not None,
                "weights": info.weights if found is None or isinstance(found, str) else str(found),
                "looked_up": None if found else f"the Hugging Face cache {hub_cache_dir()}",
            }
        )
    for model in MODELS:
        found, where = locate_weights(model)
        rows.append(
            {
                "name": model.name,
                "kind": "foundation",
                "title": model.title,
                "dim": model.dim,
                "input": model.input_size,
                "licence": model.licence,
                "gated": model.gated,
                "hub": model.hub_repo,
                "params": model.params,
                "precision": model.precision,
                "weights_found": found is not None,
                "weights": None if found is None else str(found),
                "looked_up": where,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Encoders: --encoder NAME [--weights FILE_OR_DIR]")
    for column in ("name", "dim", "input", "licence", "gated", "hub repository", "weights"):
        table.add_column(column, justify="right" if column in ("dim", "input") else "left")
    for row in rows:
        if row["kind"] == "built-in" and row["weights_found"]:
            weights = row["weights"]
        elif row["kind"] == "built-in":
            weights = f"not found ({row['weights']})"
        else:
            weights = f"[green]{row['weights']}[/green]" if row["weights"] else "not found"
        table.add_row(
            row["name"],
            str(row["dim"]),
            str(row["input"]),
            row["licence"],
            "yes" if row["gated"] else "no",
            row["hub"] or "-",
            weights,
        )
    console.print(table)
    console.print(
        f"Weights are looked up, never downloaded: --weights, then {weights_home()}/NAME/, "
        f"then the Hugging Face cache {hub_cache_dir()}. To fetch one on a machine with "
        "internet: `huggingface-cli login` (gated models), `huggingface-cli download REPO "
        "--local-dir DIR`, then --weights DIR.",
        highlight=False,
    )
