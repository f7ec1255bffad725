"""A labelled archive of both dev sets with slide metadata, as the README's Cases section
builds it: LC25000 source tiles (lung) and IDC patients split into their IDC and non-IDC
patches (breast; two slides per patient, so a case has several slides), with the columns
organ, site (the dataset), diagnosis and a synthetic year and date."""

from __future__ import annotations

import csv
from pathlib import Path

from data_paths import IDC, LC


def _rows(source: Path) -> list[dict[str, str]]:
    with (source / "manifest.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def year_of(index: int) -> int:
    """The synthetic year of the index-th slide of a set: 2012 to 2024 in turn."""
    return 2012 + index % 13


def write_cases_manifests(folder: Path, lc_groups: int, idc_patients: int) -> list[Path]:
    """Manifests (absolute paths; grouped by `group`) of the first `lc_groups` LC25000 source
    tiles of each class and the first `idc_patients` IDC patients."""
    folder.mkdir(parents=True, exist_ok=True)
    fields = ["path", "label", "patient", "group", "organ", "site", "diagnosis", "year", "received"]
    written = []
    lc, chosen = _rows(LC), {}
    for row in lc:
        members = chosen.setdefault(row["label"], [])
        if row["group"] not in members and len(members) < lc_groups:
            members.append(row["group"])
    order = sorted(g for members in chosen.values() for g in members)
    idc, patients = _rows(IDC), []
    for row in idc:
        if row["patient"] not in patients and len(patients) < idc_patients:
            patients.append(row["patient"])
    for name, source, rows, key in (
        ("lc25000.csv", LC, lc, lambda r: r["group"] if r["group"] in order else None),
        ("idc.csv", IDC, idc, lambda r: r["patient"] if r["patient"] in patients else None),
    ):
        keys = order if source == LC else patients
        with (folder / name).open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                if (value := key(row)) is None:
                    continue
                year = year_of(keys.index(value))
                lung = source == LC
                writer.writerow(
                    {
                        "path": str((source / row["path"]).resolve()),
                        "label": row["label"],
                        "patient": "" if lung else row["patient"],
                        "group": row["group"] if lung else f"{row['patient']}-{row['label']}",
                        "organ": "lung" if lung else "breast",
                        "site": "LC25000" if lung else "IDC",
                        "diagnosis": row["label"],
                        "year": year,
                        "received": f"{year}-0{1 + keys.index(value) % 9}-15",
                    }
                )
        written.append(folder / name)
    return written
