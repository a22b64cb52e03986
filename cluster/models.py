"""Networks by name, for every framework, without importing one.

A model name is one of:

* a built-in of :data:`cluster.recipes.MODELS` (``seed_cnn``, ``fast_net``);
* ``torchvision:<name>``: any classification model of
  ``torchvision.models.list_models()``, freshly initialised (torch);
* ``keras:<name>``: a ``keras.applications`` model without its top, with a new
  head (TensorFlow);
* ``package.module:function``: a builder of the user's, importable where the
  workers run (either framework).

Every builder answers one contract: called with ``num_classes``,
``in_channels`` and ``image_size``, it returns a ``torch.nn.Module`` or a
``keras.Model`` that maps the normalised batch (NCHW for torch, NHWC for
Keras) to logits. The zoo's builders repeat a grayscale batch to the three
channels their networks take. A checkpoint's ``state.json`` keeps the name, so
predict rebuilds the network without knowing the recipe that trained it.
"""

from __future__ import annotations

import re

from cluster.errors import UserError
from cluster.recipes import MODELS

__all__ = ["ZOOS", "build", "builders", "check_model", "from_import_path"]

# prefix → framework → "module:function" taking a ModelSpec whose name is "<prefix>:<the zoo's name>"
ZOOS: dict[str, dict[str, str]] = {
    "torchvision": {"torch": "cluster.pytorch.zoo:torchvision_model"},
    "keras": {"tensorflow": "cluster.tf.zoo:keras_application"},
}
# a builder of the user's: dotted module, a colon, an attribute
_IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
# torch's loop normalises the batch before the model; a Keras model gets a normalising front (cluster.tf.zoo)
_USER_BUILDER = {"torch": "cluster.models:from_import_path", "tensorflow": "cluster.tf.zoo:user_model"}


def builders(name: str) -> dict[str, str]:
    """Framework → the ``module:function`` that builds the network ``name`` from a ModelSpec.

    Raises:
        UserError: for a name that is none of the forms above.
    """
    if name in MODELS:
        return MODELS[name]
    prefix, colon, rest = name.partition(":")
    if colon and prefix in ZOOS and rest:
        return ZOOS[prefix]
    if _IMPORT_PATH.match(name):
        return _USER_BUILDER
    raise UserError(f"model={name!r} is unknown; choose one of {', '.join(MODELS)}, "
                    f"{', '.join(f'{zoo}:<name>' for zoo in ZOOS)}, or a builder as 'package.module:function'.")


def check_model(name: str, framework: str) -> None:
    """Raises UserError when ``name`` is no model, or none that ``framework`` can build."""
    frameworks = builders(name)
    if framework not in frameworks:
        raise UserError(f"model={name!r} is not implemented for framework={framework!r}; choose "
                        f"{' or '.join(repr(f) for f in frameworks)}, or another model.")


def build(spec, framework: str):
    """The network ``spec.name`` names, freshly initialised, for ``framework`` (imports that framework's code)."""
    from cluster.frameworks import load

    check_model(spec.name, framework)
    return load(builders(spec.name)[framework])(spec)


def from_import_path(spec):
    """A user's builder, named ``package.module:function`` by ``spec.name``, called with the contract's arguments."""
    from cluster.frameworks import load

    try:
        builder = load(spec.name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"model={spec.name!r} cannot be imported here ({e}); install its package where the "
                        "workers run, or check the name.") from None
    return builder(num_classes=spec.num_classes, in_channels=spec.in_channels, image_size=spec.image_size)
