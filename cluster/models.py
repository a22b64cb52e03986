"""Networks by name, for every framework, without importing one.

A model name is one of:

* a built-in of :data:`cluster.recipes.MODELS` (``seed_cnn``, ``fast_net``);
* ``torchvision:<name>``: any classification model of
  ``torchvision.models.list_models()``, freshly initialised (torch);
* ``timm:<name>``: any model of ``timm.list_models()``, freshly initialised
  (torch; timm is the optional extra ``trainflow[timm]``);
* ``keras:<name>``: a ``keras.applications`` model without its top, with a new
  head (TensorFlow);
* ``package.module:function``: a builder of the user's, importable where the
  workers run (either framework);
* a name an installed package registers under the entry-point group
  ``trainflow.models`` (its value a ``package.module:function`` builder).

Every builder answers one contract: called with ``num_classes``,
``in_channels`` and ``image_size``, it returns a ``torch.nn.Module`` or a
``keras.Model`` that maps the normalised batch (NCHW for torch, NHWC for
Keras) to logits. The zoo's builders repeat a grayscale batch to the three
channels their networks take. A checkpoint's ``state.json`` keeps the name, so
predict rebuilds the network without knowing the recipe that trained it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import site
import sysconfig
from collections.abc import Iterable
from pathlib import Path

from cluster.errors import UserError
from cluster.recipes import MODELS

__all__ = ["ENTRY_POINTS", "ZOOS", "build", "builders", "check_model", "driver_only_modules", "from_import_path",
           "plugin_models"]

# prefix → framework → "module:function" taking a ModelSpec whose name is "<prefix>:<the zoo's name>"
ZOOS: dict[str, dict[str, str]] = {
    "torchvision": {"torch": "cluster.pytorch.zoo:torchvision_model"},
    "timm": {"torch": "cluster.pytorch.zoo:timm_model"},
    "keras": {"tensorflow": "cluster.tf.zoo:keras_application"},
}
# zoos whose package is an optional extra of trainflow's: the package → the extra
_EXTRAS = {"timm": "timm"}
# a builder of the user's: dotted module, a colon, an attribute
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
# torch's loop normalises the batch before the model; a Keras model gets a normalising front (cluster.tf.zoo)
_USER_BUILDER = {"torch": "cluster.models:from_import_path", "tensorflow": "cluster.tf.zoo:user_model"}


ENTRY_POINTS = "trainflow.models"  # the entry-point group through which installed packages add models


def plugin_models() -> dict[str, str]:
    """The models installed packages register under ENTRY_POINTS: name → ``package.module:function``."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)}


def builders(name: str) -> dict[str, str]:
    """Framework → the ``module:function`` that builds the network ``name`` from a ModelSpec.

    Raises:
        UserError: for a name that is none of the forms above.
    """
    if name in MODELS:
        return MODELS[name]
    if name in plugin_models():
        return _USER_BUILDER
    prefix, colon, rest = name.partition(":")
    if colon and prefix in ZOOS and rest:
        return ZOOS[prefix]
    if _IMPORT_PATH.match(name):
        return _USER_BUILDER
    raise UserError(f"model={name!r} is unknown; choose one of {', '.join([*MODELS, *plugin_models()])}, "
                    f"{', '.join(f'{zoo}:<name>' for zoo in ZOOS)}, or a builder as 'package.module:function'.")


def check_model(name: str, framework: str) -> None:
    """Raises UserError when ``name`` is no model, none that ``framework`` can build, or one of a zoo whose
    package is not installed here (looked up, not imported)."""
    frameworks = builders(name)
    if framework not in frameworks:
        raise UserError(f"model={name!r} is not implemented for framework={framework!r}; choose "
                        f"{' or '.join(repr(f) for f in frameworks)}, or another model.")
    prefix = name.partition(":")[0]
    if prefix in _EXTRAS and importlib.util.find_spec(prefix) is None:
        raise UserError(f"model={name!r} needs {prefix}, which is not installed; pip install "
                        f"'trainflow[{_EXTRAS[prefix]}]', or choose another model.")


def build(spec, framework: str):
    """The network ``spec.name`` names, freshly initialised, for ``framework`` (imports that framework's code)."""
    from cluster.frameworks import load

    check_model(spec.name, framework)
    return load(builders(spec.name)[framework])(spec)


def from_import_path(spec):
    """A user's builder, named ``package.module:function`` by ``spec.name`` or registered under that name by an
    installed package, called with the contract's arguments."""
    from cluster.frameworks import load

    try:
        builder = load(plugin_models().get(spec.name, spec.name))
    except (ImportError, AttributeError) as e:
        raise UserError(f"model={spec.name!r} cannot be imported here ({e}); install its package where the "
                        "workers run, or check the name.") from None
    return builder(num_classes=spec.num_classes, in_channels=spec.in_channels, image_size=spec.image_size)


def driver_only_modules(names: Iterable[str]) -> list[str]:
    """Where the user's builders among ``names`` (``package.module:function``) live on this machine, for each
    whose top-level package or module no installed distribution holds (a folder or a file on ``sys.path``, not
    under site-packages): a cluster's nodes get those with the project's code, and use their own installed
    copies of the rest. Names of no builder, builders not importable here and this project's own packages (which
    travel anyway) are left out."""
    project = Path(__file__).resolve().parents[1]
    sites = {*site.getsitepackages(), site.getusersitepackages(), sysconfig.get_paths()["purelib"],
             sysconfig.get_paths()["platlib"]}
    installed = [project / package for package in ("flows", "tasks", "cluster")] + [Path(p).resolve() for p in sites]
    found: list[str] = []
    registered = plugin_models()
    for name in names:
        name = registered.get(name, name)
        if not _IMPORT_PATH.match(name or ""):
            continue
        spec = importlib.util.find_spec(name.partition(":")[0].split(".")[0])
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            continue
        where = Path(next(iter(spec.submodule_search_locations)) if spec.submodule_search_locations else spec.origin)
        if not any(where.resolve().is_relative_to(p) for p in installed) and str(where) not in found:
            found.append(str(where))
    return found
