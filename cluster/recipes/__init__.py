"""Training recipes and the networks they train, by name: one frozen record each, registered once.

A recipe is everything about *how* a model learns that is not data or
hardware: the network, the optimizer, the learning-rate schedule, the loss,
training-time and evaluation-time augmentation, and how often to checkpoint.
Like :mod:`cluster.frameworks`, the records name their framework code by
import path (``"module:attribute"``) and never import it, so the flow, the
Prefect form and the CLI list recipes without loading torch or TensorFlow.

Adding a recipe means one module (its framework parts) and one entry here, or, without a fork, a package
that registers a :class:`Recipe` under the entry-point group ``trainflow.recipes`` (its module, like these
records, imports no framework).
"""

from __future__ import annotations

import importlib.metadata
import warnings
from dataclasses import dataclass, field

from cluster.errors import UserError, registered

__all__ = ["ENTRY_POINTS", "MODELS", "RECIPES", "Recipe", "get_recipe", "plugin_recipes"]

# network name → framework → "module:Class" taking a ModelSpec; a checkpoint's state.json names its network,
# so a published version is rebuilt (for predict) without knowing which recipe trained it
MODELS: dict[str, dict[str, str]] = {
    "seed_cnn": {"torch": "cluster.pytorch.model:SeedCNN", "tensorflow": "cluster.tf.model:build_model"},
    "fast_net": {"torch": "cluster.recipes.fast_cifar:FastNet"},
}


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """What a recipe is called, which network it trains, and where each framework's parts live."""

    name: str
    summary: str  # one line for the form and the CLI's help
    model: str  # a key of MODELS: the network it trains unless the run names another
    any_model: bool = True  # False: its parts are written for its own network (initialisation, layer groups)
    # framework name → "module:function" (cfg: TrainLoopConfig) -> that framework's parts (optimizer, loss, …)
    parts: dict[str, str] = field(default_factory=dict)
    checkpoint_every: int = 1  # epochs between checkpoints; the last epoch always writes one
    min_image_size: int = 8  # the network's pooling needs at least this side

    def check(self, framework: str, image_size: int | None = None) -> None:
        """Raises UserError when this recipe cannot train with ``framework`` or on images of ``image_size``."""
        if framework not in self.parts:
            raise UserError(f"recipe={self.name!r} is not implemented for framework={framework!r}; choose "
                            f"{' or '.join(repr(f) for f in self.parts)}, or another recipe.")
        if image_size is not None and image_size < self.min_image_size:
            raise UserError(f"recipe={self.name!r} needs images of at least {self.min_image_size} pixels a side; "
                            f"set image_size to {self.min_image_size} or more.")

    def check_model(self, model: str) -> None:
        """Raises UserError when this recipe cannot train the network ``model`` (a name of cluster.models)."""
        if model != self.model and not self.any_model:
            raise UserError(f"recipe={self.name!r} trains its own network ({self.model}) only; leave model empty, "
                            "or choose a recipe that takes any model, such as 'article'.")

    def checkpoints_after(self, epoch: int, last_epoch: int) -> bool:
        """Whether training writes (and reports) a checkpoint after ``epoch``."""
        return epoch == last_epoch or epoch % self.checkpoint_every == 0


# fast_net's recipes: its three 2x2 pools need 16 pixels; a few-second epoch need not checkpoint every time
_FAST_NET = {"model": "fast_net", "any_model": False, "checkpoint_every": 2, "min_image_size": 16}

RECIPES: dict[str, Recipe] = {
    recipe.name: recipe for recipe in (
        Recipe(name="article",
               summary="the source article's: seed_cnn, SGD at a constant rate, cross-entropy, no augmentation",
               model="seed_cnn",
               parts={"torch": "cluster.recipes.article:torch_parts",
                      "tensorflow": "cluster.recipes.article:tensorflow_parts"}),
        Recipe(name="finetune",
               summary="any network, pretrained or not: AdamW (lr ~1e-3) with warm-up and cosine decay, label "
                       "smoothing, flip + shift; from starting weights, the backbone at a tenth of the head's rate",
               model="seed_cnn", parts={"torch": "cluster.recipes.finetune:torch_parts"}),
        Recipe(name="fast_cifar",
               summary="fast_net (patch-whitened residual-free conv net with batch norm), Nesterov SGD with warm-up "
                       "and linear decay, label smoothing, lookahead, flip + translate, flip + shift at test time",
               parts={"torch": "cluster.recipes.fast_cifar:torch_parts"}, **_FAST_NET),
        Recipe(name="fast_cifar_muon",
               summary="fast_cifar with Muon for the filters (lr is its step, ~0.24), a linear decay, no lookahead, "
                       "and all but the last two epochs on images scaled down (from 5/8 to 7/8 of their side)",
               parts={"torch": "cluster.recipes.fast_cifar_muon:torch_parts"}, **_FAST_NET),
    )
}


ENTRY_POINTS = "trainflow.recipes"  # the entry-point group through which installed packages add recipes


def plugin_recipes() -> dict[str, Recipe]:
    """The recipes installed packages register under ENTRY_POINTS (each entry a :class:`Recipe` named as the
    entry), by name; one that fails to load, or is no such Recipe, is left out with a warning saying why."""
    found = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINTS):
        try:
            recipe = ep.load()
        except Exception as e:  # a broken plugin must not take the built-ins down with it
            warnings.warn(f"trainflow: recipe {ep.name!r} ({ep.value}) failed to load and is left out: {e}",
                          stacklevel=2)
            continue
        if not isinstance(recipe, Recipe) or recipe.name != ep.name:
            warnings.warn(f"trainflow: recipe {ep.name!r} ({ep.value}) is not a cluster.recipes.Recipe named "
                          f"{ep.name!r}, and is left out", stacklevel=2)
            continue
        if ep.name in RECIPES:
            warnings.warn(f"trainflow: recipe {ep.name!r} ({ep.value}) would replace a built-in, and is left out",
                          stacklevel=2)
            continue
        found[ep.name] = recipe
    return found


RECIPES.update(plugin_recipes())


def get_recipe(name: str) -> Recipe:
    """The registered recipe called ``name``.

    Raises:
        UserError: for a name that is not registered.
    """
    return registered(RECIPES, "recipe", name)
