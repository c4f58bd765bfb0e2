"""Data layer: the scene-graph type, sources (each registers itself on import), negatives, the DataModule."""
from datamodules import coco, negclip_tsv, shapes, visual_genome  # noqa: F401  (each import registers a source)
from datamodules.datamodule import CaptionDataModule, data_schema
from datamodules.fields import FIELDS
from datamodules.graph import Entity, Relation, SceneGraph
from datamodules.source import SOURCES, Sample

__all__ = ["FIELDS", "SOURCES", "CaptionDataModule", "Entity", "Relation", "Sample", "SceneGraph", "data_schema"]
