"""The typed dataflow IR: tensor types with symbolic dims, declared ops, functions, programs.

Imports nothing else of mlxc; everything else imports it.
"""

from . import ops as _ops  # noqa: F401  (registers the op vocabulary)
from .attrs import Kernel, RopeKind, RopeScaling
from .errors import MlxcError, ParseError, VerifyError
from .export import from_json, to_dot, to_graph, to_json, to_svg
from .graph import Function, FunctionBuilder, Operation, Program, Value
from .opdef import OPS, OpDef, OpGroup, lookup
from .parser import parse_program
from .printer import print_function, print_program
from .state import State, StateKind
from .types import DType, Dim, Quant, TensorType
from .verify import verify

__all__ = [
    "OPS", "DType", "Dim", "Function", "FunctionBuilder", "MlxcError", "OpDef", "OpGroup", "Operation",
    "Kernel", "ParseError", "Program", "Quant", "RopeKind", "RopeScaling", "State", "StateKind", "TensorType", "Value",
    "VerifyError", "from_json",
    "lookup", "parse_program", "print_function", "print_program", "to_dot", "to_graph", "to_json", "to_svg",
    "verify",
]
