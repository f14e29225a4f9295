"""Every ``REFINERY_*`` variable, declared once: its type, default and a line of doc.

The settings come in typed groups, frozen dataclasses whose fields name their variable:

- ``Settings``: where Refinery keeps its state (the home of the embedded stores, an external
  database or MLflow server, the corpus folder) and the UIs' addresses;
- ``ServingSettings``: the served Bento (engine, batching, following an alias, the gateway's
  limits, keys, cache, traffic log, image generation), with its nested groups
  ``RequestLimits``, ``TrafficSettings``, ``TraceSettings`` and ``ImageSettings``;
- ``RunSettings``: the Dagster code location and its runs (the pod a model run asks for, the
  OpenVINO exporter, the Pushgateway).

Each group is built with ``from_env()``, once per process, by whoever starts the process (a
command, a BentoML service, a Dagster resource), and passed down; tests construct one (or call
``from_env({...})`` with a mapping) instead of patching the environment. Nothing here runs at
import time. A value that cannot be used raises ``SettingError``, naming the variable and what
was wrong. ``describe`` lists every setting with its value (secrets masked) and its doc:
``refinery settings`` prints it.
"""

# `setting(...)` returns a dataclasses.field, as `field(...)` itself does.
# ruff: noqa: RUF009

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_HOME = REPO_ROOT / ".refinery"
DEFAULT_CORPUS_DIR = REPO_ROOT / "data" / "corpus"
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # what `make ui` serves over the local store

# Telemetry that cannot reach the network only slows things down; model hubs are not reachable
# (models load from pip packages or local folders); per-tensor loading bars drown the logs.
OFFLINE_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "DAGSTER_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TOKENIZERS_PARALLELISM": "false",
}
# Variables that say where a command finds its stores and what it runs on.
STORE_ENV_PREFIXES = ("REFINERY_", "DAGSTER_", "MLFLOW_", "BENTOML_")


def isolated_env(**settings: str) -> dict[str, str]:
    """This process's environment without any store setting, plus ``OFFLINE_ENV`` and
    ``settings``: for a child command that must find everything through what it is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(STORE_ENV_PREFIXES)}
    return {**env, **OFFLINE_ENV, **settings}


MASK = "****"
Secret = Literal["", "value", "url"]  # "url": only the password inside the URL is secret


class SettingError(ValueError):
    """A variable whose value cannot be used; the message names it and says what is wrong."""


def setting(
    env: str,
    default: Any,
    doc: str,
    *,
    secret: Secret = "",
    minimum: float | None = None,
    maximum: float | None = None,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A field read from the variable ``env`` (unset or empty: ``default``). ``parse`` turns
    the text into the value when the field's type alone does not say how."""
    meta = {"env": env, "doc": doc, "secret": secret, "min": minimum, "max": maximum}
    # A secret stays out of repr(), so a logged settings object shows no key or password.
    return field(default=default, repr=not secret, metadata={**meta, "parse": parse})


class SettingsGroup:
    """What every settings group shares: reading from the environment, and checking values
    (also when a test constructs the group directly)."""

    TITLE: ClassVar[str] = ""

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        fallback: Mapping[str, str] | None = None,
    ) -> Self:
        """The group from ``environ`` (default: this process's environment). ``fallback``:
        values for variables that ``environ`` leaves unset (a Bento's pinned home)."""
        env: Mapping[str, str] = os.environ if environ is None else environ
        if fallback:
            env = {**fallback, **{k: v for k, v in env.items() if v}}
        errors: list[str] = []
        group = _read(cls, env, errors)
        if errors:
            raise SettingError("; ".join(errors))
        return group

    def __post_init__(self) -> None:
        cls = type(self)
        errors = [e for f in _fields(cls) if (e := _check(cls, f, getattr(self, f.name)))]
        if errors:
            raise SettingError("; ".join(errors))


# --- the groups ----------------------------------------------------------------------------
def _resolved_path(raw: str) -> Path:
    return Path(raw).expanduser().resolve()


def _base_url(raw: str) -> str:
    return raw.rstrip("/")


def _postgres_url(raw: str) -> str:
    """A Postgres URL (postgresql://, postgres:// or postgresql+<driver>://)."""
    scheme = urlsplit(raw).scheme
    if scheme.split("+")[0] not in ("postgresql", "postgres"):
        raise ValueError(
            "expected a postgresql://user:password@host:port/database URL, got scheme "
            f"{scheme or '(none)'!r}"
        )
    return raw


@dataclass(frozen=True)
class Settings(SettingsGroup):
    """Where Refinery keeps its state: one home directory for every embedded store, one
    variable each to point elsewhere; and the UIs' addresses, for links."""

    TITLE: ClassVar[str] = "stores and links"

    home: Path = setting(
        "REFINERY_HOME",
        DEFAULT_HOME,
        "Home of the embedded stores (Postgres, MLflow, Dagster, BentoML, models, reports).",
        parse=_resolved_path,
    )
    database_url: str | None = setting(
        "REFINERY_DATABASE_URL",
        None,
        "An external Postgres (pgvector >= 0.7) instead of the embedded one.",
        secret="url",
    )
    dagster_database_url: str | None = setting(
        "REFINERY_DAGSTER_DATABASE_URL",
        None,
        "A Postgres database for Dagster's runs, event logs, schedules and run queue, as the "
        "Helm chart keeps them; unset: SQLite under the home.",
        secret="url",
        parse=_postgres_url,
    )
    mlflow_tracking_uri_override: str | None = setting(
        "REFINERY_MLFLOW_TRACKING_URI",
        None,
        "An MLflow server instead of the local SQLite store under the home.",
        secret="url",
    )
    corpus_dir: Path = setting(
        "REFINERY_CORPUS_DIR", DEFAULT_CORPUS_DIR, "The corpus folder that ingestion reads."
    )
    mlflow_ui_url_override: str | None = setting(
        "REFINERY_MLFLOW_UI_URL",
        None,
        "Base URL of the MLflow UI, for links. Unset: the tracking server when "
        "REFINERY_MLFLOW_TRACKING_URI is an http(s) one (without its credentials), else the "
        "local UI that `make ui` starts (http://127.0.0.1:5000).",
        parse=_base_url,
    )
    dagster_ui_url: str = setting(
        "REFINERY_DAGSTER_UI_URL",
        "http://127.0.0.1:3100",
        "Base URL of the Dagster UI, for links.",
        parse=_base_url,
    )

    @property
    def pgdata(self) -> Path:
        return self.home / "postgres"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_artifacts_dir(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def mlflow_tracking_uri(self) -> str:
        if self.mlflow_tracking_uri_override:
            return self.mlflow_tracking_uri_override
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_ui_url(self) -> str:
        if self.mlflow_ui_url_override:
            return self.mlflow_ui_url_override
        server = urlsplit(self.mlflow_tracking_uri_override or "")
        if server.scheme in ("http", "https") and server.hostname:
            netloc = server.hostname + (f":{server.port}" if server.port else "")
            return urlunsplit((server.scheme, netloc, server.path.rstrip("/"), "", ""))
        return LOCAL_MLFLOW_UI

    @property
    def mlflow_is_local(self) -> bool:
        return self.mlflow_tracking_uri_override is None

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def bentoml_home(self) -> Path:
        return self.home / "bentoml"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"


@dataclass(frozen=True)
class RequestLimits(SettingsGroup):
    """Bounds on what one request to the gateway may ask for (``serving.openai_schema.Limits``)."""

    TITLE: ClassVar[str] = "request limits"

    max_body_bytes: int = setting(
        "REFINERY_MAX_BODY_BYTES", 1_000_000, "Largest request body (413 above).", minimum=1
    )
    max_prompt_chars: int = setting(
        "REFINERY_MAX_PROMPT_CHARS", 8_000, "Characters of one message's text.", minimum=1
    )
    max_messages: int = setting(
        "REFINERY_MAX_MESSAGES", 64, "Messages in one chat request.", minimum=1
    )
    max_tokens: int = setting(
        "REFINERY_MAX_TOKENS", 512, "Tokens one request may ask the model for.", minimum=1
    )
    max_embedding_inputs: int = setting(
        "REFINERY_MAX_EMBEDDING_INPUTS", 256, "Texts in one embeddings request.", minimum=1
    )
    max_inflight: int = setting(
        "REFINERY_MAX_INFLIGHT",
        64,
        "Requests in progress per gateway worker before it answers 503.",
        minimum=1,
    )
    max_images: int = setting(
        "REFINERY_MAX_IMAGES", 4, "image_url parts in one request.", minimum=0
    )
    max_image_bytes: int = setting(
        "REFINERY_MAX_IMAGE_BYTES",
        700_000,
        "Decoded bytes of one image (the body limit allows ~730 KB of it).",
        minimum=1,
    )
    max_image_pixels: int = setting(
        "REFINERY_MAX_IMAGE_PIXELS",
        16_000_000,
        "Pixels of one image, checked before it is decoded.",
        minimum=1,
    )


@dataclass(frozen=True)
class TrafficSettings(SettingsGroup):
    """The traffic log (``serving.traffic.TrafficLog``): what is kept of each request."""

    TITLE: ClassVar[str] = "traffic log"

    sample_rate: float = setting(
        "REFINERY_TRAFFIC_SAMPLE", 1.0, "Share of requests logged (0 turns the log off).",
        minimum=0.0, maximum=1.0,
    )  # fmt: skip
    privacy: Literal["full", "hash"] = setting(
        "REFINERY_TRAFFIC_PRIVACY",
        "full",
        "full: prompts and answers are stored; hash: only keyed hashes and lengths.",
    )
    salt: str = setting(
        "REFINERY_TRAFFIC_SALT", "", "Key of the hashes (privacy=hash).", secret="value"
    )
    max_queue: int = setting(
        "REFINERY_TRAFFIC_QUEUE", 10_000, "Rows waiting to be written before new ones drop.",
        minimum=1,
    )  # fmt: skip
    batch_size: int = setting("REFINERY_TRAFFIC_BATCH", 256, "Rows written per COPY.", minimum=1)
    flush_s: float = setting(
        "REFINERY_TRAFFIC_FLUSH_S", 1.0, "Seconds between writes of a partial batch.", minimum=0.0
    )
    retry_s: float = 5.0  # after a database error, the writer waits this long (not a variable)


@dataclass(frozen=True)
class TraceSettings(SettingsGroup):
    """Served answers as MLflow traces (``serving.traces.ServedTraces``)."""

    TITLE: ClassVar[str] = "served traces"

    sample_rate: float = setting(
        "REFINERY_TRACE_SAMPLE", 0.1, "Share of chat and RAG answers written as MLflow traces (0: none).",
        minimum=0.0, maximum=1.0,
    )  # fmt: skip
    experiment: str = setting(
        "REFINERY_TRACE_EXPERIMENT", "refinery-served", "The MLflow experiment served traces go to."
    )
    blind: bool = setting(
        "REFINERY_TRACE_BLIND",
        True,
        "Tag traces with a keyed hash of the model version (refinery.model_key), not the version, "
        "so people rating them in MLflow cannot tell the models apart.",
    )
    max_queue: int = setting(
        "REFINERY_TRACE_QUEUE", 1000, "Traces waiting to be written before new ones drop.",
        minimum=1,
    )  # fmt: skip
    retry_s: float = 30.0  # after MLflow failed, the writer waits this long (not a variable)


@dataclass(frozen=True)
class ImageSettings(SettingsGroup):
    """The image model service and the limits of ``POST /v1/images/generations``."""

    TITLE: ClassVar[str] = "image generation"

    max_batch: int = setting(
        "REFINERY_IMAGE_MAX_BATCH",
        16,
        "Images sampled together across requests (1: each request on its own).",
        minimum=1,
    )
    max_latency_ms: int = setting(
        "REFINERY_IMAGE_MAX_LATENCY_MS", 30_000, "Longest wait for a batch to fill.", minimum=1
    )
    max_steps: int = setting(
        "REFINERY_IMAGE_MAX_STEPS", 50, "Sampling steps one request may ask for.", minimum=1
    )
    max_n: int = setting("REFINERY_IMAGE_MAX_N", 4, "Images in one request.", minimum=1)
    max_side: int = setting(
        "REFINERY_IMAGE_MAX_SIDE", 1024, "Longest side of an image, in pixels.", minimum=8
    )


def _api_keys(raw: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in raw.split(",") if k.strip())


@dataclass(frozen=True)
class ServingSettings(SettingsGroup):
    """The served Bento: the chat engine, following an alias, the gateway in front of it."""

    TITLE: ClassVar[str] = "serving"

    engine: Literal["auto", "openvino", "hf", "static"] = setting(
        "REFINERY_ENGINE",
        "auto",
        "Generation engine: auto (OpenVINO on CPU when exported, else transformers), or one.",
    )
    chat_max_batch: int = setting(
        "REFINERY_CHAT_MAX_BATCH", 32, "Sequences in the engine's running batch.", minimum=1
    )
    speculation: Literal["none", "prompt_lookup", "draft_model"] = setting(
        "REFINERY_SPECULATION",
        "none",
        "Speculative decoding for the whole deployment (OpenVINO engine).",
    )
    device: Literal["auto", "cpu", "cuda"] = setting(
        "REFINERY_DEVICE",
        "auto",
        "Device of the chat model; cuda refuses to start without a GPU.",
    )
    torch_threads: int | None = setting(
        "REFINERY_TORCH_THREADS",
        None,
        "Threads of the chat and image models (unset: torch's default).",
        minimum=1,
    )
    follow_alias: str = setting(
        "REFINERY_FOLLOW_ALIAS",
        "",
        "Registry alias whose moves the service follows (empty: the pinned version only).",
    )
    follow_interval_s: float = setting(
        "REFINERY_FOLLOW_INTERVAL_S", 30.0, "Seconds between looks at the alias.", minimum=0.1
    )
    request_timeout_s: float = setting(
        "REFINERY_REQUEST_TIMEOUT_S", 120.0, "Every request ends within this.", minimum=0.1
    )
    entry_workers: int = setting(
        "REFINERY_ENTRY_WORKERS", 1, "Worker processes of the entry service.", minimum=1
    )
    access_log: bool = setting("REFINERY_ACCESS_LOG", True, "BentoML's access log: on or off.")
    guard: Literal["block", "off"] = setting(
        "REFINERY_GUARD", "block", "Prompt-injection guard and document screen: block or off."
    )
    api_keys: tuple[str, ...] = setting(
        "REFINERY_API_KEYS",
        (),
        "Comma-separated API keys the API accepts (none: the API is open).",
        secret="value",
        parse=_api_keys,
    )
    redis_url: str | None = setting(
        "REFINERY_REDIS_URL",
        None,
        "Redis for the response cache (unset: a cache in process memory).",
        secret="url",
    )
    cache_ttl_s: float = setting(
        "REFINERY_CACHE_TTL_S", 600.0, "Seconds a cached response lives.", minimum=0.0
    )
    embed_max_batch: int = setting(
        "REFINERY_EMBED_MAX_BATCH", 32, "Texts embedded per model call.", minimum=1
    )
    price_per_hour: float = setting(
        "REFINERY_PRICE_PER_HOUR",
        0.10,
        "USD per hour of one serving replica, for the cost of each request.",
        minimum=0.0,
    )
    rag_min_confidence: float | None = setting(
        "REFINERY_RAG_MIN_CONFIDENCE",
        None,
        "RAG answers below this confidence are withheld: a quote from the chunks, or not in the documents (unset: the calibrated one).",
        minimum=0.0,
        maximum=1.0,
    )
    stop_grace_s: float = setting(
        "REFINERY_STOP_GRACE_S",
        15.0,
        "`refinery serve`: seconds requests in flight get to finish on stop.",
        minimum=0.0,
    )
    limits: RequestLimits = field(default_factory=RequestLimits)
    traffic: TrafficSettings = field(default_factory=TrafficSettings)
    traces: TraceSettings = field(default_factory=TraceSettings)
    images: ImageSettings = field(default_factory=ImageSettings)


@dataclass(frozen=True)
class RunSettings(SettingsGroup):
    """The Dagster code location and its runs."""

    TITLE: ClassVar[str] = "runs"

    run_accelerator: Literal["cpu", "gpu"] = setting(
        "REFINERY_RUN_ACCELERATOR",
        "cpu",
        "On Kubernetes, the pod of a model run: bigger CPU pods, or a GPU node.",
    )
    run_gpus: int = setting(
        "REFINERY_RUN_GPUS", 1, "GPUs per model run when the accelerator is gpu.", minimum=1
    )
    openvino_python: Path | None = setting(
        "REFINERY_OPENVINO_PYTHON",
        None,
        "A Python with the OpenVINO exporter (unset: .venv-openvino, made on first use).",
    )
    pushgateway_url: str | None = setting(
        "REFINERY_PUSHGATEWAY_URL",
        None,
        "Prometheus Pushgateway the drift check pushes its outcome to (unset: none).",
        secret="url",
    )


GROUPS: tuple[type[SettingsGroup], ...] = (Settings, ServingSettings, RunSettings)


# --- reading and checking ------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The fields' types (annotations are strings here: ``from __future__ import annotations``)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if "env" in f.metadata]


def _groups(cls: type) -> list[dataclasses.Field[Any]]:
    """The nested groups of ``cls`` (fields whose type is a settings group)."""
    hints = _hints(cls)
    return [
        f
        for f in dataclasses.fields(cls)
        if isinstance(hints[f.name], type) and issubclass(hints[f.name], SettingsGroup)
    ]


def _read(cls: type[SettingsGroup], env: Mapping[str, str], errors: list[str]) -> Any:
    values: dict[str, Any] = {}
    for f in _fields(cls):
        raw = (env.get(f.metadata["env"]) or "").strip()
        if not raw:
            continue
        try:
            value = _parse(cls, f, raw)
        except SettingError as err:
            errors.append(str(err))
            continue
        if problem := _check(cls, f, value):
            errors.append(problem)
        else:
            values[f.name] = value
    for g in _groups(cls):
        values[g.name] = _read(_hints(cls)[g.name], env, errors)
    if errors:
        return None
    return cls(**values)


def _type(cls: type, f: dataclasses.Field[Any]) -> Any:
    """The field's type, without the ``| None`` of an optional one."""
    hint = _hints(cls)[f.name]
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _parse(cls: type, f: dataclasses.Field[Any], raw: str) -> Any:
    name = f.metadata["env"]
    if f.metadata["parse"] is not None:
        try:
            return f.metadata["parse"](raw)
        except SettingError:
            raise
        except ValueError as err:  # a parser's message says what is wrong, not the value
            raise SettingError(f"{name}: {err}") from None
    hint = _type(cls, f)
    if typing.get_origin(hint) is Literal:
        return raw  # checked against the choices by _check
    if hint is bool:
        return _parse_bool(name, raw)
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise SettingError(f"{name} must be a whole number, got {raw!r}") from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise SettingError(f"{name} must be a number, got {raw!r}") from None
    if hint is Path:
        return Path(raw).expanduser()
    return raw


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse_bool(name: str, raw: str) -> bool:
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise SettingError(f"{name} must be on or off, got {raw!r}")


def _all_groups(groups: tuple[type[SettingsGroup], ...] = GROUPS) -> Iterator[type[SettingsGroup]]:
    """Every group, each followed by its nested ones (the order ``describe`` lists them in)."""
    for group in groups:
        yield group
        yield from _all_groups(tuple(_hints(group)[g.name] for g in _groups(group)))


def _check(cls: type, f: dataclasses.Field[Any], value: Any) -> str | None:
    """What is wrong with ``value`` for ``f`` (None: nothing), naming its variable."""
    name = f.metadata["env"]
    if value is None:
        return None
    hint = _type(cls, f)
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            return f"{name} must be one of {', '.join(choices)}, got {value!r}"
    low, high = f.metadata["min"], f.metadata["max"]
    if low is not None and high is not None and not low <= value <= high:
        return f"{name} must be in [{low:g}, {high:g}], got {value}"
    if low is not None and value < low:
        return f"{name} must be >= {low:g}, got {value}"
    if high is not None and value > high:
        return f"{name} must be <= {high:g}, got {value}"
    return None


# --- listing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SettingInfo:
    """One setting as ``refinery settings`` shows it."""

    group: str
    variable: str
    value: str  # secrets masked; "" when unset
    default: bool  # the value is the default
    doc: str


def describe(*groups: SettingsGroup) -> list[SettingInfo]:
    """Every setting of ``groups`` (their nested groups included), secrets masked."""
    out: list[SettingInfo] = []
    for group in groups:
        cls = type(group)
        for f in _fields(cls):
            value = getattr(group, f.name)
            out.append(
                SettingInfo(
                    group=cls.TITLE,
                    variable=f.metadata["env"],
                    value=_shown(value, f.metadata["secret"]),
                    default=value == f.default,
                    doc=f.metadata["doc"],
                )
            )
        out += describe(*(getattr(group, g.name) for g in _groups(cls)))
    return out


def variables() -> list[str]:
    """Every declared variable's name."""
    return [f.metadata["env"] for group in _all_groups() for f in _fields(group)]


def _shown(value: Any, secret: Secret) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(MASK if secret else str(v) for v in value)
    text = str(value)
    if secret == "value":
        return MASK if text else ""
    if secret == "url":
        return mask_url(text)
    return text


def mask_url(url: str) -> str:
    """``url`` with the password in it (user:password@, or a password= parameter) masked."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, _, password = userinfo.partition(":")
        if password:
            netloc = f"{user}:{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in ("password", "pass", "pwd") for k, _ in pairs):
            masked = [
                (k, MASK if k.lower() in ("password", "pass", "pwd") else v) for k, v in pairs
            ]
            query = urlencode(masked, safe="/*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
