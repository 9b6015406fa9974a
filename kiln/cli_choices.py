"""What the `kiln` command offers, read from the library's own declarations: the choices of each
option with a fixed set of values (enums, so --help lists them) and the defaults it shows.

They are read from the declaring modules' source rather than imported: most stage modules import
torch, which would add seconds to every `kiln` command, even `kiln --help`; each command imports its
stage when it runs. tests/test_cli.py checks every value read here against the imported one."""

from __future__ import annotations

import ast
import importlib.util
from enum import Enum
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import typer

from kiln.errors import RequestError
from kiln.pipeline.schedulers import DEFAULT as DEFAULT_SCHEDULER, SCHEDULERS


@lru_cache(maxsize=None)
def _module_source(module: str) -> ast.Module:
    return ast.parse(Path(importlib.util.find_spec(module).origin).read_text())


def _literals(pairs) -> SimpleNamespace:
    """name -> value for each (name, expression) whose expression is a literal; the others are left out."""
    values = {}
    for name, node in pairs:
        try:
            values[name] = ast.literal_eval(node)
        except ValueError:
            pass
    return SimpleNamespace(**values)


def declared(module: str, name: str):
    """What `module` declares as `name`: a constant's value, or a class's field defaults or a function's
    parameter defaults as attributes. Read from the source rather than imported: most stage modules
    import torch, which would add seconds to every `kiln` command, even `kiln --help`; each command
    imports its stage when it runs. tests/test_cli.py checks every value against the imported one."""
    for node in _module_source(module).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return _literals((s.target.id, s.value) for s in node.body if isinstance(s, ast.AnnAssign) and s.value)
        if isinstance(node, ast.FunctionDef) and node.name == name:
            a = node.args
            positional = [*a.posonlyargs, *a.args]
            defaulted = zip(positional[len(positional) - len(a.defaults):], a.defaults)  # defaults fill the last ones
            keyword = ((k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None)
            return _literals((arg.arg, d) for arg, d in (*defaulted, *keyword))
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
            return ast.literal_eval(node.value)
    raise LookupError(f"{module} declares no {name}")


class Choice(str, Enum):
    """A choice among the library's own values: Typer lists them in --help and refuses the others.
    It prints as its value (as StrEnum does), so messages read `--target ngc`."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def _choices(name: str, values) -> type[Choice]:
    return Choice(name, [(v, v) for v in values])


PORTS = declared("kiln.serving.server", "Ports")
URLS = declared("kiln.clients.client", "DEFAULT_URLS")
LIMITS = declared("kiln.pipeline.request", "Limits")
REQUEST_DEFAULTS = declared("kiln.pipeline.request", "Defaults")
TUNING = declared("kiln.model_repository.configs", "Tuning")
CALIBRATION = declared("kiln.export.quantize", "Calibration")

Protocol = _choices("Protocol", declared("kiln.clients.client", "PROTOCOLS"))
Method = _choices("Method", (*declared("kiln.training.config", "METHODS"), "base"))
PredictionType = _choices("PredictionType", declared("kiln.models.tiny", "PREDICTION_TYPES"))
ImportFamily = _choices("ImportFamily", declared("kiln.models.single_file", "FAMILY_CHOICES"))
TinyFamily = _choices("TinyFamily", declared("kiln.models.tiny", "TINY_FAMILIES"))
Width = _choices("Width", declared("kiln.models.benchmark", "WIDTHS"))
Precision = _choices("Precision", declared("kiln.export.precision", "PRECISIONS"))
CalibrationMethod = _choices("CalibrationMethod", declared("kiln.export.quantize", "METHODS"))
Target = _choices("Target", declared("kiln.model_repository.builder", "TARGETS"))
Backend = _choices("Backend", dict.fromkeys(b for per_target in declared("kiln.model_repository.builder", "BACKENDS").values()
                                            for b in per_target))
Crop = _choices("Crop", declared("kiln.dataset.prepare", "CROPS"))
ControlKind = _choices("ControlKind", declared("kiln.dataset.control", "CONTROLS"))
OrtAccelerator = _choices("OrtAccelerator", declared("kiln.model_repository.configs", "ORT_ACCELERATORS"))
TorchDevice = _choices("TorchDevice", declared("kiln.pipeline.engines", "TORCH_DEVICES"))
TorchDtype = _choices("TorchDtype", declared("kiln.pipeline.engines", "TORCH_DTYPES"))
Scenario = _choices("Scenario", declared("kiln.benchmarks.loadgen", "SCENARIOS"))


def scheduler_name(name: str) -> str:
    """A scheduler as the server names it: Kiln's short names and `default`, or any diffusers class
    a Stable Diffusion pipeline takes (any case)."""
    from kiln.pipeline.schedulers import canonical_name

    try:
        return canonical_name(name)
    except RequestError as e:
        raise typer.BadParameter(str(e)) from None


LOAD_USERS = (*Protocol.__members__, "gateway")  # Triton's protocols, and the gateway's A1111 door


def protocol_list(value: str) -> str:
    """A comma-separated subset of the load test's users, e.g. http,grpc."""
    chosen = [p.strip() for p in value.split(",") if p.strip()]
    if not chosen or any(p not in LOAD_USERS for p in chosen):
        raise typer.BadParameter(f"{value!r}: expected {', '.join(LOAD_USERS)}, or several comma-separated")
    return ",".join(chosen)


SCHEDULER_HELP = f"{', '.join([DEFAULT_SCHEDULER, *SCHEDULERS])}, or a diffusers scheduler class (e.g. LMSDiscreteScheduler)"
