"""Each component owns its configuration model: the root schema's field for a
section holds the model the component declares, defined in the component's own
configuration module (never in edgeway.config, which only assembles them)."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from pydantic import BaseModel

from edgeway.config import Config
from edgeway.south.base import adapter_class, registered_sections

ROOT_SECTIONS = {"gateway", "log", "receipts", "input_limits"}
"""Sections that belong to the gateway as a whole, not to one component."""


def _section_models(annotation: Any) -> list[type[BaseModel]]:
    """The models in a field's type: ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _section_models(arg)]


@pytest.mark.parametrize("section", registered_sections())
def test_an_adapter_section_holds_the_model_its_adapter_declares(section: str) -> None:
    model = adapter_class(section).config_model
    assert _section_models(Config.model_fields[section].annotation) == [model]
    assert model.__module__.startswith("edgeway.south.") and model.__module__.endswith("config")


def test_every_component_section_is_defined_next_to_its_component() -> None:
    for name, field in Config.model_fields.items():
        models = _section_models(field.annotation)
        assert models, name
        for model in models:
            if name in ROOT_SECTIONS:
                assert model.__module__ in ("edgeway.config", "edgeway.config_types"), name
            else:
                assert model.__module__ not in ("edgeway.config", "edgeway.config_types"), (
                    f"{name}: {model.__name__} belongs in its component's configuration module"
                )
