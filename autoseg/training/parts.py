"""The training recipe's part tables: losses, optimisers, learning-rate schedules and augmentations, plus the
networks of :mod:`autoseg.networks.parts`; and :func:`resolve_recipe`, which checks a recipe against them.

Each table holds the built-ins and the parts other packages declare under the ``autoseg.plugins`` entry-point
group. A loss, optimiser, schedule or augmentation is declared with one line around a factory whose tunable
parameters are typed keyword arguments with defaults::

    TINY_LOSS = loss_part("tiny_loss", tiny_loss)     # def tiny_loss(*, regions, batch_dice, ignore_label, w: float = 1.0)

and the entry point ``tiny_loss = "my_package.parts:TINY_LOSS"``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from autoseg.errors import PluginError
from autoseg.networks.parts import check_error_head, network_parts
from autoseg.planner.recipe import PART_KINDS, PartChoice, Recipe
from autoseg.registry import PluginInfo, lookup, params_from_signature, part_table
from autoseg.training.augmentation_presets import AUGMENTATIONS
from autoseg.training.losses import LOSSES
from autoseg.training.optim import OPTIMIZERS, SCHEDULES

#: arguments a part's factory gets from the configuration or the trainer, never from the recipe
_CONTEXT = {"loss": ("regions", "batch_dice", "ignore_label"), "optimizer": ("params", "defaults"),
            "schedule": (), "augmentation": ()}


def _part(kind: str, name: str, factory: Callable[..., Any], doc: str | None = None) -> PluginInfo:
    """A :class:`PluginInfo` whose ``build(**params)`` binds the checked parameters to ``factory``."""
    params = params_from_signature(factory, skip=_CONTEXT[kind])
    return PluginInfo(name, kind, doc or (factory.__doc__ or name).strip(), params,
                      lambda **kw: functools.partial(factory, **kw))


def loss_part(name: str, factory: Callable[..., Any], doc: str | None = None) -> PluginInfo:
    """Declare a loss: ``factory(*, regions, batch_dice, ignore_label, **params) -> nn.Module`` (called as
    ``loss(outputs, targets)`` with the conventions of :mod:`autoseg.training.losses`)."""
    return _part("loss", name, factory, doc)


def optimizer_part(name: str, factory: Callable[..., Any], doc: str | None = None) -> PluginInfo:
    """Declare an optimiser: ``factory(params, defaults, **options) -> torch.optim.Optimizer``."""
    return _part("optimizer", name, factory, doc)


def schedule_part(name: str, factory: Callable[..., Any], doc: str | None = None) -> PluginInfo:
    """Declare a learning-rate schedule: ``factory(**options)`` returns ``lr(initial_lr, epoch, epochs)``."""
    return _part("schedule", name, factory, doc)


def augmentation_part(name: str, factory: Callable[..., Any], doc: str | None = None) -> PluginInfo:
    """Declare an augmentation: ``factory(**options)`` returns an ``AugmentationPreset``."""
    return _part("augmentation", name, factory, doc)


_DECLARE = {"loss": loss_part, "optimizer": optimizer_part, "schedule": schedule_part,
            "augmentation": augmentation_part}
_BUILTINS = {"loss": LOSSES, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "augmentation": AUGMENTATIONS}


def part_tables() -> dict[str, dict[str, PluginInfo]]:
    """Every kind's table: ``{"network": {...}, "loss": {...}, ...}``, built-ins first.

    Raises:
        PluginError: a broken entry point, or a name used twice.
    """
    tables = {"network": network_parts()}
    for kind, builtins in _BUILTINS.items():
        tables[kind] = part_table([_DECLARE[kind](n, f) for n, f in builtins.items()], (kind,))
    return tables


def _resolve(kind: str, choice: PartChoice, table: Mapping[str, PluginInfo]) -> PartChoice:
    if kind == "network":
        check_error_head(choice.name, choice.params, table)
    if choice.name not in table and choice.origin != "built-in":
        raise PluginError(f"{kind} {choice.name!r} is not installed: it came from {choice.origin}; install the "
                          "package that provides it (pip install <that package>) and run the command again.")
    info = lookup(choice.name, table, kind)
    return PartChoice(info.name, info.validate(choice.params), info.origin)


def resolve_recipe(recipe: Recipe, tables: Mapping[str, Mapping[str, PluginInfo]] | None = None) -> Recipe:
    """The recipe with every part looked up and its parameters checked, converted and completed.

    Raises:
        PluginError: an unknown part ("did you mean", the list of valid ones), an unknown or bad parameter (the
            valid ones), or a part whose package is not installed (the package named).
    """
    tables = part_tables() if tables is None else tables
    return replace(recipe, **{k: _resolve(k, recipe.part(k), tables[k]) for k in PART_KINDS})


def build_part(kind: str, choice: PartChoice, tables: Mapping[str, Mapping[str, PluginInfo]] | None = None) -> Any:
    """The object a resolved part's ``build`` makes (a :class:`~autoseg.networks.parts.NetworkPart`, or a factory
    with the recipe's parameters bound)."""
    tables = part_tables() if tables is None else tables
    resolved = _resolve(kind, choice, tables[kind])
    return tables[kind][resolved.name].create(resolved.params)


def check_recipe_builds(recipe: Recipe, *, regions: bool, ignore_label: int | None,
                        tables: Mapping[str, Mapping[str, PluginInfo]] | None = None) -> None:
    """Build the recipe's loss, optimiser, schedule and augmentation once on stand-ins, so a value a factory refuses
    (``loss=dice_topk:k=300``) stops planning rather than the training it would have started.

    Raises:
        TrainingConfigError, PluginError: a part refuses its parameters (the part's own message).
    """
    import torch

    tables = part_tables() if tables is None else tables
    build_part("loss", recipe.loss, tables)(regions=regions, batch_dice=True, ignore_label=ignore_label)
    build_part("optimizer", recipe.optimizer, tables)([torch.nn.Parameter(torch.zeros(1))], None)
    build_part("schedule", recipe.schedule, tables)()
    build_part("augmentation", recipe.augmentation, tables)()
