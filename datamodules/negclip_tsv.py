"""NegCLIP's released training file (vinid/neg_clip `CsvDataset`), so users can train on the paper's data.

A TAB-separated file with a header; the first column is an unnamed row id; `title` is the caption,
`filepath` the image (relative to `image_root`), `neg_caption` a Python-literal list of hard negative
captions (none empty), `neg_image` a non-empty Python-literal list of row ids of hard negative images in the same
file. A row that breaks this stops reading with its file and line.
"""
from __future__ import annotations

import ast
import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from configs.checks import Rule, existing_dir, existing_file
from datamodules.images import load_image
from datamodules.jsonstream import read_text
from datamodules.source import SOURCES, Sample

COLUMNS = ("title", "filepath", "neg_caption", "neg_image")


def _literal(value: str, kind: type, where: str, column: str) -> list:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"{where}: column '{column}' is not a Python literal list ({e.__class__.__name__}): {value!r}") from None
    if not isinstance(parsed, list) or not all(isinstance(x, kind) for x in parsed):
        raise ValueError(f"{where}: column '{column}' must be a list of {kind.__name__}, got {value!r}")
    return parsed


def read_negclip_tsv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a NegCLIP TSV, validated: each names its line when something is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: NegCLIP TSV not found")
    with io.StringIO(read_text(path), newline="") as f:  # (read_text: bytes that are not UTF-8 name the offset)
        # pandas' to_csv wrote it: a field holding a quote character is quoted, with its quotes doubled (the
        # released file's lists of captions with an apostrophe are), which csv's default dialect reads back
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or any(c not in header for c in COLUMNS):
            raise ValueError(f"{path}: header must hold {', '.join(COLUMNS)} (after the row-id column), got {header}")
        col = {name: header.index(name) for name in COLUMNS}
        rows = []
        for index, fields in enumerate(reader):
            line = reader.line_num  # the file line a row ends on (a quoted field may hold a line break)
            where = f"{path}:{line}"
            if len(fields) != len(header):
                raise ValueError(f"{where}: {len(fields)} fields, the header has {len(header)}")
            title = fields[col["title"]].strip()
            if not title:
                raise ValueError(f"{where}: empty caption in column 'title'")
            negatives = _literal(fields[col["neg_caption"]], str, where, "neg_caption")
            empty = [j for j, n in enumerate(negatives) if not n.strip()]
            if empty:
                raise ValueError(f"{where}: column 'neg_caption': empty hard negative caption(s) at {empty}: "
                                 f"{fields[col['neg_caption']][:120]!r}")
            neighbours = _literal(fields[col["neg_image"]], int, where, "neg_image")
            if not neighbours:  # NegCLIP's hard image is drawn from this list: an empty one fails in a loader worker
                raise ValueError(f"{where}: column 'neg_image' is an empty list (each row needs at least one hard "
                                 "negative image row id)")
            rows.append({
                "row_id": int(fields[0]) if fields[0].strip().lstrip("-").isdigit() else index,
                "title": title,
                "filepath": fields[col["filepath"]],
                "neg_caption": negatives,
                "neg_image": neighbours,
                "where": where,
            })
    position = {r["row_id"]: i for i, r in enumerate(rows)}
    for r in rows:
        missing = [j for j in r["neg_image"] if j not in position]
        if missing:
            raise ValueError(f"{r['where']}: neg_image row ids {missing} are not rows of the file")
        r["neighbours"] = [position[j] for j in r["neg_image"]]
    return rows


@SOURCES.register("negclip_tsv")
class NegCLIPTSV:
    """One split of NegCLIP's training data: captions, released hard captions and released neighbour images."""

    @dataclass
    class Config:
        train_file: str = "mscoco_with_negatives_training.csv"
        val_file: str = "mscoco_with_negatives_valid.csv"
        image_root: str = "."

        RULES: ClassVar[dict[str, Rule]] = {"train_file": existing_file, "val_file": existing_file,
                                            "image_root": existing_dir}

    def __init__(self, cfg: "NegCLIPTSV.Config", split: str) -> None:
        files = {"train": cfg.train_file, "val": cfg.val_file}
        if split not in files:
            raise ValueError(f"negclip_tsv has the splits {', '.join(files)}; benchmarks use COCO, ARO and SugarCrepe")
        self.root = Path(cfg.image_root)
        self.rows = read_negclip_tsv(files[split])
        self.neighbours = [r["neighbours"] for r in self.rows]  # the released hard images, as a table

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        r = self.rows[index]
        negatives = {"released": r["neg_caption"]}
        return Sample(
            image=load_image(self.root / r["filepath"], r["where"]),
            captions=[r["title"]],
            key=r["where"],
            extra={"negative_captions": lambda k: {kind: v for kind, v in negatives.items() if v},
                   "neighbours": r["neighbours"]},
        )
