"""``stimage-nb gdc slides|download|clinical``: TCGA (and any GDC project) slides and clinical data."""

from __future__ import annotations

import sys
from pathlib import Path

from ..atomic import write_csv


def add_cli(sub) -> None:
    p = sub.add_parser("gdc", help="find, download and describe slides of a GDC project (TCGA, CPTAC, ...)")
    gsub = p.add_subparsers(dest="gdc_command", required=True)

    s = gsub.add_parser("slides", help="a project's diagnostic slides and their cases -> slides.csv + gdc_manifest.txt")
    s.add_argument("--project", required=True, help="GDC project id, e.g. TCGA-BRCA (comma-separated for several)")
    s.add_argument("--out", required=True, type=Path, help="folder for slides.csv and gdc_manifest.txt")
    s.add_argument("--strategy", default="Diagnostic Slide", choices=["Diagnostic Slide", "Tissue Slide"])
    s.add_argument("--max-slides", type=int, default=None, help="only the first N (by file name)")
    s.set_defaults(func=_cmd_slides)

    d = gsub.add_parser("download", help="download the files of a GDC manifest (resumable, md5-verified)")
    d.add_argument("--manifest", required=True, type=Path, help="GDC manifest (id filename md5 size state)")
    d.add_argument("--dest", required=True, type=Path, help="folder; files go to DEST/<file_id>/<file_name>")
    d.add_argument("--token-file", type=Path, default=None,
                   help="GDC token file for controlled-access data (read, never copied or printed)")
    d.add_argument("--retries", type=int, default=5)
    d.set_defaults(func=_cmd_download)

    c = gsub.add_parser("clinical", help="clinical table of a project's cases (overall survival as time/event)")
    c.add_argument("--project", required=True)
    c.add_argument("--out", required=True, type=Path, help="CSV file to write")
    c.set_defaults(func=_cmd_clinical)


def _projects(v: str) -> list[str]:
    return [x.strip() for x in v.split(",") if x.strip()]


def _client(token_file: Path | None = None):
    from ._client import GDCClient

    token = None
    if token_file is not None:
        if not token_file.is_file():
            from ..errors import StimageInputError

            raise StimageInputError(f"{token_file}: GDC token file not found")
        token = token_file.read_text().strip()
    return GDCClient(token=token)


def _fail(e: Exception) -> int:
    print(f"stimage-nb gdc: error: {e}", file=sys.stderr)
    return 2


def _cmd_slides(a) -> int:
    from ._client import GDCError
    from ._slides import find_slides, write_manifest

    try:
        with _client() as cl:
            slides = find_slides(_projects(a.project), strategy=a.strategy, client=cl, max_slides=a.max_slides)
    except GDCError as e:
        return _fail(e)
    a.out.mkdir(parents=True, exist_ok=True)
    man = write_manifest(slides, a.out / "gdc_manifest.txt")
    tab = a.out / "slides.csv"
    write_csv(slides, tab)
    gb = slides["file_size"].sum() / 1e9
    print(f"{len(slides)} slides of {slides['patient_id'].nunique()} patients ({gb:.1f} GB) -> {tab}, {man}")
    return 0


def _cmd_download(a) -> int:
    from ._client import GDCError
    from ._download import download

    try:
        with _client(a.token_file) as cl:
            report = download(a.manifest, a.dest, client=cl, retries=a.retries)
    except GDCError as e:
        return _fail(e)
    df = report.to_frame()
    out = a.dest / "download_report.csv"
    write_csv(df, out)
    counts = df["status"].value_counts().to_dict()
    print(f"{counts.get('downloaded', 0)} downloaded, {counts.get('present', 0)} already present, "
          f"{counts.get('failed', 0)} failed -> {a.dest} (report: {out})")
    for r in report.failed:
        print(f"stimage-nb gdc: {r.file_name} ({r.file_id}): {r.error}", file=sys.stderr)
    return 0 if report.ok else 1


def _cmd_clinical(a) -> int:
    from ._client import GDCError
    from ._clinical import fetch_clinical

    try:
        with _client() as cl:
            df = fetch_clinical(_projects(a.project), client=cl)
    except GDCError as e:
        return _fail(e)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(df, a.out)
    print(f"{len(df)} cases, {int(df['event'].sum())} deaths -> {a.out}")
    return 0
