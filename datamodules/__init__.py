"""Data layer: the scene-graph type, sources (each registers itself on import), negatives, the DataModule."""
from datamodules import shapes  # noqa: F401  (registers the "shapes" source)
from datamodules.datamodule import FIELDS, CaptionDataModule, data_schema
from datamodules.graph import Entity, Relation, SceneGraph
from datamodules.source import SOURCES, Sample

__all__ = ["FIELDS", "SOURCES", "CaptionDataModule", "Entity", "Relation", "Sample", "SceneGraph", "data_schema"]
