"""Makes ``FASTKV`` a first-class vLLM attention backend.

vLLM 0.26 parses ``--attention-backend`` / ``attention_backend=`` by looking the
name up in ``AttentionBackendEnum``, so third-party names only work if they are
members of that enum. Python enums cannot be extended through their public API,
so we add the member the way ``Enum`` itself builds members, before vLLM's CLI
parser or config validation runs (general plugins load first).

Three more seams are needed, each kept as small as possible:

* pickling: vLLM ships its config to engine-core and worker processes. An enum
  member pickles by value; a *spawned* child that has not loaded plugins yet would
  not know ours. ``FASTKV`` pickles as a call to :func:`backend_member`, so
  unpickling imports this module, which registers the member first.
* CPU selection: vLLM's CPU platform ignores the requested backend and always
  returns ``CPU_ATTN``; we let an explicit ``FASTKV`` request through.
* start-up validation: the platform's ``check_and_update_config`` hook runs while
  the engine config is built, in the front-end process. We validate the FastKV
  settings there, so a bad value fails before any engine process starts. If that
  error ends the program (``vllm serve``), it is printed as one line naming the
  field rather than as a traceback through vLLM's server start-up.
"""

from __future__ import annotations

import functools
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger
from vllm.v1.attention.backends.registry import AttentionBackendEnum

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger(f"vllm.{__name__}")

BACKEND_NAME = "FASTKV"
BACKEND_PATH = "vllm_fastkv.attention_backend.FastKVAttentionBackend"
CPU_BACKEND_PATH = "vllm_fastkv.attention_backend.FastKVCPUAttentionBackend"


def backend_member(name: str = BACKEND_NAME) -> AttentionBackendEnum:
    """Return ``AttentionBackendEnum[name]``, registering FASTKV first if needed."""
    _register_enum_member()
    return AttentionBackendEnum[name]


def is_fastkv_selected(vllm_config: VllmConfig) -> bool:
    """Whether the user asked for the FASTKV attention backend."""
    backend = vllm_config.attention_config.backend
    return backend is not None and backend.name == BACKEND_NAME


@functools.cache
def _register_enum_member() -> None:
    enum_cls = AttentionBackendEnum
    if BACKEND_NAME in enum_cls.__members__:
        return
    member = object.__new__(enum_cls)
    member._name_ = BACKEND_NAME
    member._value_ = BACKEND_PATH
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    # Plain class attribute first: EnumType.__setattr__ refuses names already in
    # the member map, and attribute access (AttentionBackendEnum.FASTKV) needs it.
    type.__setattr__(enum_cls, BACKEND_NAME, member)
    enum_cls._member_map_[BACKEND_NAME] = member
    enum_cls._member_names_.append(BACKEND_NAME)
    enum_cls._value2member_map_[BACKEND_PATH] = member

    enum_reduce = enum_cls.__reduce_ex__

    def reduce_ex(self: AttentionBackendEnum, protocol: Any) -> Any:
        if self is member:
            return backend_member, (BACKEND_NAME,)
        return enum_reduce(self, protocol)

    type.__setattr__(enum_cls, "__reduce_ex__", reduce_ex)


@functools.cache
def _patch_platform() -> None:
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    check_and_update = platform_cls.check_and_update_config.__func__

    def check_and_update_config(cls: type, vllm_config: VllmConfig) -> None:
        if is_fastkv_selected(vllm_config):
            from vllm_fastkv.engine_config import validate_engine_config

            validate_engine_config(vllm_config)
        check_and_update(cls, vllm_config)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)

    if current_platform.is_cpu():
        select = platform_cls.get_attn_backend_cls.__func__

        def get_attn_backend_cls(
            cls: type, selected_backend: AttentionBackendEnum | None, *args: Any, **kwargs: Any
        ) -> str:
            if selected_backend is not None and selected_backend.name == BACKEND_NAME:
                logger.info_once("Using FASTKV attention backend (torch paged attention on CPU).")
                return CPU_BACKEND_PATH
            return select(cls, selected_backend, *args, **kwargs)

        platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _fastkv_config_error(exc: BaseException) -> BaseException | None:
    """The FastKVConfigError behind ``exc`` (pydantic wraps errors raised in validators)."""
    from pydantic import ValidationError

    from vllm_fastkv.config import FastKVConfigError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, FastKVConfigError):
            return exc
        if isinstance(exc, ValidationError):
            for err in exc.errors():
                inner = (err.get("ctx") or {}).get("error")
                if isinstance(inner, FastKVConfigError):
                    return inner
        exc = exc.__cause__ or exc.__context__
    return None


@functools.cache
def _install_excepthook() -> None:
    previous = sys.excepthook

    def excepthook(
        exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        config_error = _fastkv_config_error(exc)
        if config_error is None:
            previous(exc_type, exc, tb)
            return
        print(f"error: {config_error}", file=sys.stderr)

    sys.excepthook = excepthook


def register() -> None:
    """The ``vllm.general_plugins`` entry point; idempotent, runs in every vLLM process."""
    _register_enum_member()
    _patch_platform()
    _install_excepthook()
    from vllm_fastkv.propagation import install_model_hook

    install_model_hook()
