"""``stimage-nb encoders``: list the registered pathology foundation encoders (or show one)."""

from __future__ import annotations

import json


def add_cli(sub) -> None:
    p = sub.add_parser("encoders", help="list the registered pathology foundation encoders (UNI, Virchow2, ...)")
    p.add_argument("name", nargs="?", help="show one encoder in full (name, alias or Hugging Face id)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd)


def format_table(entries) -> str:
    """A fixed-width table of the registry (one line per encoder)."""
    rows = [("name", "encoder", "timm architecture", "input", "µm/px", "tile µm", "features", "params", "licence",
             "gated", "weights")]
    for e in entries:
        rows.append((e.name, e.title, e.architecture, f"{e.input_px} px", f"{e.um_per_px:g}", f"{e.tile_um:g}",
                     f"{e.feature_dim} ({e.output})", e.params_card, e.licence.split(" (")[0].split(";")[0],
                     "yes" if e.gated else "no", e.hf_hub_id or e.weights_files[0]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _cmd(a) -> int:
    from . import get_encoder, list_encoders

    if a.name:
        e = get_encoder(a.name)
        d = e.to_dict()
        if a.json:
            print(json.dumps(d, indent=1))
        else:
            for k, v in d.items():
                print(f"{k:13s} {v}")
        return 0
    if a.json:
        print(json.dumps([e.to_dict() for e in list_encoders()], indent=1))
    else:
        print(format_table(list_encoders()))
        print("\n`stimage-nb encoders NAME` shows one in full; train with `--backbone NAME --weights PATH` "
              "(a .safetensors/.bin file or the downloaded Hugging Face folder, read offline).")
    return 0
