"""Experiment configuration: one YAML file plus dotted ``key=value`` overrides.

Everything is validated before any model or data is touched. Errors are raised as
:class:`ConfigError` with one message that names the field and says how to fix it,
because a researcher launching a sweep should learn about a typo in one second, not
after a model has loaded.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

METHODS = ("fedit", "ffa", "fedsa", "rolora", "sfed", "flasc", "flocora", "hetlora", "fdlora",
           "flora")
A_INITS = ("independent", "shared")
VERA_METHODS = ("fedit", "fedsa")


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message names field and fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClientsConfig(_Section):
    num: int = Field(10, gt=0, description="number of clients")
    per_round: int | float | Literal["all"] = Field(
        "all", description="clients per round: 'all', a count, or a fraction in (0, 1]"
    )
    min_clients: int = Field(1, gt=0, description="replies a round needs to aggregate")


class LocalConfig(_Section):
    steps: int | None = Field(5, gt=0, description="local optimizer steps per round")
    epochs: int | None = Field(None, gt=0, description="local epochs (instead of steps)")
    batch_size: int = Field(16, gt=0)
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: float = Field(5e-4, gt=0)
    head_lr: float | None = Field(
        None, gt=0, description="learning rate of the task head (None: same as lr)"
    )
    lr_A: float | None = Field(
        None, gt=0, description="learning rate of A (VeRA: lambda_d); None: same as lr"
    )
    lr_B: float | None = Field(
        None, gt=0, description="learning rate of B (VeRA: lambda_b); None: same as lr. "
        "With B starting at zero, scale c*gamma at lr is exactly scale gamma at lr_B = c*lr "
        "(AdamW) or c^2*lr (SGD)"
    )
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    keep_optimizer_state: bool = Field(
        False, description="keep each client's optimizer state across rounds"
    )
    max_grad_norm: float | None = Field(None, gt=0)


class LoraConfig(_Section):
    adapter: Literal["lora", "vera"] = Field(
        "lora", description="lora, or vera (PEFT's VeRA: frozen shared random projections, "
        "trained scaling vectors lambda_d and lambda_b; with fedsa: FedSA-VeRA)"
    )
    rank: int = Field(8, gt=0)
    client_ranks: list[int] | None = Field(
        None, description="mixed ranks (hetlora): one rank per client, or a shorter list "
        "of tiers splitting client ids into equal contiguous groups; each <= lora.rank"
    )
    alpha: float | None = Field(
        None, gt=0, description="None: 2 under scaling=fixed (FLoRA's official "
        "lora_alpha = 2r), 16 otherwise"
    )
    scaling: Literal["lora", "rslora", "sfed", "fixed"] | None = Field(
        None, description="None: the method's default (sfed for sfed, fixed for flora, lora "
        "otherwise); fixed: gamma = alpha at every rank"
    )
    a_init: Literal["independent", "shared"] | None = Field(
        None, description="None: the method's default"
    )
    targets: list[str] | None = Field(None, description="None: per-architecture default")
    dropout: float = Field(0.0, ge=0, lt=1)


class ModelConfig(_Section):
    name: str | None = Field(
        None, description="hub name, local path or offline asset (None: the task's "
        "offline default, all-MiniLM-L6-v2 or SmolLM2-135M-Instruct)"
    )
    max_length: int = Field(128, gt=0)
    load_in_4bit: bool = Field(False, description="QLoRA base weights (CUDA + bitsandbytes)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, or auto")


class DataConfig(_Section):
    source: Literal["bbc", "files", "hf"] = "bbc"
    train_path: str | None = None
    test_path: str | None = None
    dataset: str | None = Field(None, description="HF dataset name for source=hf, e.g. glue")
    subset: str | None = Field(None, description="HF dataset config, e.g. sst2")
    train_split: str = "train"
    test_split: str | None = Field("validation", description="HF split used as global test")
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = Field("question", description="causal-lm: the instruction/prompt")
    response_column: str = Field("answer", description="causal-lm: the target response")
    input_column: str | None = Field(
        None, description="causal-lm: optional extra input appended to the prompt (Alpaca)"
    )
    packing: bool = Field(False, description="causal-lm: pack examples into full blocks")
    partition: Literal["iid", "dirichlet", "classes", "size"] = "dirichlet"
    dirichlet_alpha: float = Field(0.5, gt=0)
    classes_per_client: int = Field(2, gt=0)
    min_partition_size: int = Field(10, ge=0)
    client_test_fraction: float = Field(0.2, gt=0, lt=1)
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="hold this fraction of each client's training part "
        "out of training as its validation part (stratified); choose learning rates on "
        "the validation metrics, never on the test part (0: none)"
    )
    examples_per_client: int | None = Field(
        None, gt=0, description="give every client exactly this many training examples "
        "(and data.client_test_examples test examples) with partition iid or dirichlet; "
        "client k's data does not depend on clients.num, so changing N changes only how "
        "many adapters are averaged"
    )
    client_test_examples: int = Field(
        50, gt=0, description="test examples per client with data.examples_per_client"
    )
    global_test_fraction: float = Field(0.2, gt=0, lt=1)
    max_train_examples: int | None = Field(None, gt=0)
    max_test_examples: int | None = Field(None, gt=0)


class EvalConfig(_Section):
    every: int = Field(1, ge=0, description="evaluate every k rounds (the last always); 0: never")
    at_start: bool = Field(False, description="also evaluate before training (round 0)")
    global_metrics: bool = Field(
        True, description="also score on the global test set; without a global adapter "
        "that costs one pass per client, so sweeps that only need personalised figures "
        "turn it off"
    )
    generate: int = Field(
        16, ge=0, description="causal-lm: examples per client and of the global test set "
        "answered by greedy generation for exact match"
    )
    max_new_tokens: int = Field(256, gt=0)
    few_shot: int = Field(0, ge=0, description="causal-lm: solved training examples in the prompt")
    batch_size: int = Field(64, gt=0)
    probe_size: int = Field(16, gt=0, description="examples in the fixed probe batch")


class ServerConfig(_Section):
    """How the server checks and combines uploads (any method)."""

    aggregation: Literal["mean", "median", "trimmed_mean"] = Field(
        "mean", description="mean: the method's weighted mean; median / trimmed_mean: "
        "coordinate-wise and unweighted, robust to a minority of bad clients"
    )
    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="cut from each end")
    clip_norm: float | None = Field(
        None, gt=0, description="clip each client's update (its change to the global "
        "state) to this L2 norm before combining"
    )
    max_update_norm: float | None = Field(
        None, gt=0, description="reject an update whose change has a larger L2 norm"
    )
    max_update_bytes: int | None = Field(
        None, gt=0, description="reject larger payloads (default: the largest size an "
        "honest encoding of the expected tensors can have + 64 KiB)"
    )
    optimizer: Literal["none", "sgd", "adamw"] | None = Field(
        None, description="server optimizer fed the mean client change as its gradient "
        "(FedOpt); None: the method's default (adamw for flasc, none otherwise)"
    )
    lr: float = Field(1e-3, gt=0, description="server optimizer learning rate")
    weight_decay: float = Field(0.01, ge=0, description="server AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="server AdamW betas")


class CodecConfig(_Section):
    """How one direction's messages are encoded (:mod:`sfedlora.codecs`). Unset fields
    take the method's preset (FLASC, FLoCoRA), else no compression."""

    density: float | None = Field(
        None, gt=0, le=1, description="top-k: fraction of entries kept, over all tensors"
    )
    bits: Literal[2, 4, 8] | None = Field(
        None, description="affine per-output-channel quantisation (1-D tensors stay fp32)"
    )
    dtype: Literal["fp32", "fp16", "bf16"] | None = Field(None, description="value dtype")
    delta: bool | None = Field(
        None, description="uploads: send the change to the downloaded state (default: on "
        "when the codec is lossy)"
    )
    error_feedback: bool | None = Field(
        None, description="uploads: keep what a message lost and add it to the next one"
    )


class CommConfig(_Section):
    up: CodecConfig = CodecConfig()
    down: CodecConfig = CodecConfig()


class PrivacyConfig(_Section):
    """Client-level differential privacy (DP-FedAvg): clip, average, add noise."""

    enabled: bool = False
    clip_norm: float = Field(1.0, gt=0, description="L2 bound on each client's update")
    noise_multiplier: float = Field(1.0, ge=0, description="noise std / clip_norm")
    delta: float = Field(1e-5, gt=0, lt=1)


class PersonalConfig(_Section):
    """FDLoRA: each client's personal adapter and its fusion with the global one."""

    sync_every: int = Field(
        1, gt=0, description="refresh the personal adapter from the locally trained global "
        "one in rounds divisible by this (and on the client's first round)"
    )
    holdout: int = Field(
        32, gt=0, description="examples of each client's training data kept out of "
        "training to choose the fusion weights (at most a fifth of the client's data)"
    )
    grid: list[float] = Field(
        [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1,
        description="values tried for each of w1 (global) and w2 (personal)"
    )


class CheckpointConfig(_Section):
    every: int = Field(1, ge=0, description="write a checkpoint every k rounds; 0: only on Ctrl-C")


class FlowerConfig(_Section):
    """The Flower runtime (``sfedlora.flower``); ignored by the in-process simulator."""

    round_timeout: float | None = Field(
        300.0, gt=0, description="seconds the server waits for a round's replies; clients "
        "that have not replied by then count as dropped (null: wait forever)")
    connect_timeout: float = Field(
        120.0, gt=0, description="seconds the server waits for clients.num nodes to connect")


class ExperimentConfig(_Section):
    task: Literal["classification", "causal-lm"] = "classification"
    method: Literal[METHODS] = "sfed"
    seed: int = 0
    rounds: int = Field(10, gt=0)
    clients: ClientsConfig = ClientsConfig()
    local: LocalConfig = LocalConfig()
    lora: LoraConfig = LoraConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    server: ServerConfig = ServerConfig()
    comm: CommConfig = CommConfig()
    personal: PersonalConfig = PersonalConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    flower: FlowerConfig = FlowerConfig()
    output_dir: str = "runs/latest"
    progress: bool = True

    @model_validator(mode="after")
    def _combinations(self) -> ExperimentConfig:
        from sfedlora.methods import get_method  # late import: methods import config types

        c, local, data = self.clients, self.local, self.data
        if local.steps is not None and local.epochs is not None:
            raise ValueError(
                "local.steps and local.epochs are both set; set one of them to null"
            )
        if local.steps is None and local.epochs is None:
            raise ValueError("set local.steps (optimizer steps) or local.epochs per round")
        if isinstance(c.per_round, float) and not 0 < c.per_round <= 1:
            raise ValueError(
                f"clients.per_round={c.per_round}: a fraction must lie in (0, 1]; "
                "use an integer for a count"
            )
        if isinstance(c.per_round, int) and not 0 < c.per_round <= c.num:
            raise ValueError(
                f"clients.per_round={c.per_round} must be between 1 and clients.num={c.num}"
            )
        if c.min_clients > self.clients_per_round:
            raise ValueError(
                f"clients.min_clients={c.min_clients} exceeds the {self.clients_per_round} "
                "clients sampled per round; lower it or raise clients.per_round"
            )
        method = get_method(self.method)
        if self.lora.a_init is not None and len(method.a_init_modes) < 2:
            raise ValueError(
                f"lora.a_init={self.lora.a_init!r} does not apply to method {self.method!r}, "
                f"which has no such choice ({method.a_init_note}); remove lora.a_init"
            )
        if self.lora.adapter == "vera":
            self._check_vera()
        if self.lora.client_ranks is not None:
            self._check_client_ranks(method)
        if not any(self.personal.grid):
            raise ValueError("personal.grid needs a non-zero weight, e.g. [0, 0.5, 1]")
        if data.examples_per_client is not None and data.partition not in ("iid", "dirichlet"):
            raise ValueError(
                f"data.examples_per_client with data.partition={data.partition!r}: fixed-size "
                "clients are drawn iid or by Dirichlet label mixes; set data.partition=iid "
                "or dirichlet, or remove data.examples_per_client"
            )
        if data.source == "files" and not data.train_path:
            raise ValueError("data.source=files needs data.train_path (a CSV, TSV or JSONL file)")
        if data.source == "hf" and not data.dataset:
            raise ValueError("data.source=hf needs data.dataset, e.g. data.dataset=glue")
        if self.task == "causal-lm" and data.source == "bbc":
            raise ValueError(
                "task=causal-lm needs prompt/response data: set data.source=files (e.g. "
                "data.train_path=../shared/data/gsm8k/train.jsonl) or data.source=hf"
            )
        if self.privacy.enabled and self.a_init == "independent":
            raise ValueError(
                "privacy.enabled with lora.a_init=independent: each client's first A is its "
                "own random draw, so whether it took part shows in the released mean beyond "
                "what clipping its change can bound; set lora.a_init=shared"
            )
        if self.privacy.enabled and self.server.aggregation != "mean":
            raise ValueError(
                f"privacy.enabled with server.aggregation={self.server.aggregation!r}: the "
                "privacy accounting assumes a mean of clipped updates; set server.aggregation=mean"
            )
        self._check_codecs(method)
        if method.merge_into_base:
            self._check_merging()
        return self

    def _check_client_ranks(self, method) -> None:
        ranks, num = self.lora.client_ranks, self.clients.num
        if not method.mixed_ranks:
            raise ValueError(
                f"lora.client_ranks with method={self.method!r}, which needs one rank for "
                "every client; use method=hetlora or flora, or remove lora.client_ranks"
            )
        if not ranks or len(ranks) > num or any(r <= 0 or r > self.lora.rank for r in ranks):
            raise ValueError(
                f"lora.client_ranks={ranks}: give 1 to clients.num={num} ranks, each between "
                f"1 and lora.rank={self.lora.rank} (the server's rank)"
            )
        if self.server_optimizer != "none" or self.lora.adapter != "lora":
            raise ValueError("lora.client_ranks works with LoRA adapters and no server "
                             "optimizer; remove server.optimizer / lora.adapter")

    def _check_vera(self) -> None:
        if self.method not in VERA_METHODS:
            raise ValueError(
                f"lora.adapter=vera with method={self.method!r}: VeRA's projections are "
                f"frozen and shared, so only {', '.join(VERA_METHODS)} apply to it (fedsa "
                "is FedSA-VeRA); choose one of them or lora.adapter=lora"
            )
        for key in ("scaling", "a_init"):
            if getattr(self.lora, key) is not None:
                raise ValueError(
                    f"lora.{key} does not apply to lora.adapter=vera (VeRA has no LoRA scale "
                    f"and its projections come from one seed); remove lora.{key}"
                )

    def _check_merging(self) -> None:
        """FLoRA: clients merge the downloaded factors into their base weights and start
        every round from a fresh adapter; refuse settings that break either."""
        refused = [  # (refused?, the setting, why)
            (self.lora.adapter != "lora", "lora.adapter", "stacking needs LoRA factors"),
            (self.server_optimizer != "none", "server.optimizer",
             "the merged factors are the exact weighted sum a server optimizer would change"),
            (self.server.aggregation != "mean", "server.aggregation",
             "stacking is exact for the weighted mean only"),
            (self.privacy.enabled, "privacy.enabled", "the stacked factors carry no noise"),
            (self.local.keep_optimizer_state, "local.keep_optimizer_state",
             "every round starts from a fresh adapter"),
            (not self.codec("down").lossless, "comm.down",
             "clients merge what they receive into their base weights, so a lossy download "
             "would drift them away from the server's record"),
            (self.codec("up").delta, "comm.up.delta",
             "the server never sees a client's fresh A, so a change to it cannot be decoded"),
        ]
        for bad, setting, why in refused:
            if bad:
                raise ValueError(f"method=flora does not work with this {setting}: {why}; "
                                 f"remove or change {setting}")

    def _check_codecs(self, method) -> None:
        down = self.comm.down
        if down.error_feedback:
            raise ValueError(
                "comm.down.error_feedback: downloads carry absolute values to clients that "
                "keep no copy, so there is no residual to feed back; remove it"
            )
        if down.delta:
            raise ValueError(
                "comm.down.delta: clients keep no copy of the last download to add a "
                "change to; remove it"
            )
        up = self.codec("up")
        if not up.error_feedback:
            return
        if not any(method.plan(r).upload for r in (1, 2)):
            raise ValueError(
                f"comm.up.error_feedback with method {self.method!r}, which sends nothing "
                "up; remove comm.up.error_feedback"
            )
        if up.lossless:
            raise ValueError(
                "comm.up.error_feedback with a lossless upload codec: nothing is lost, so "
                "there is nothing to feed back; set comm.up.density < 1, comm.up.bits or "
                "comm.up.dtype, or remove error_feedback"
            )
        if not up.delta:
            raise ValueError(
                "comm.up.error_feedback needs comm.up.delta=true: the residual is a change, "
                "and adding it to absolute values would count it twice"
            )

    # Derived values, resolved in one place so every runtime agrees on them.
    @property
    def clients_per_round(self) -> int:
        """N: clients aggregated per round (fixed, so the sfed scale does not jump)."""
        per = self.clients.per_round
        if per == "all":
            return self.clients.num
        if isinstance(per, float):
            return max(1, round(per * self.clients.num))
        return per

    @property
    def model_name(self) -> str:
        if self.model.name:
            return self.model.name
        return "SmolLM2-135M-Instruct" if self.task == "causal-lm" else "all-MiniLM-L6-v2"

    @property
    def scaling(self) -> str:
        from sfedlora.methods import get_method

        return self.lora.scaling or get_method(self.method).default_scaling

    def codec(self, direction: Literal["up", "down"]):
        """The resolved codec of a direction: explicit settings, then the method's
        preset, then no compression (uploads use delta coding when lossy)."""
        from sfedlora.codecs import Codec
        from sfedlora.methods import get_method

        preset = get_method(self.method).comm.get(direction, {})
        given = getattr(self.comm, direction).model_dump(exclude_none=True)
        settings = {"density": 1.0, "bits": None, "dtype": "fp32", **preset, **given}
        probe = Codec(**{k: v for k, v in settings.items() if k in ("density", "bits", "dtype")})
        settings.setdefault("delta", direction == "up" and not probe.lossless)
        settings.setdefault("error_feedback", False)
        try:
            return Codec(**settings)
        except ValueError as exc:
            raise ValueError(f"comm.{direction}: {exc}; fix comm.{direction}") from None

    def client_rank(self, cid: int) -> int:
        """Client ``cid``'s LoRA rank (``lora.rank`` unless ranks are mixed)."""
        ranks = self.lora.client_ranks
        if ranks is None:
            return self.lora.rank
        return ranks[cid * len(ranks) // self.clients.num]

    def client_gamma(self, cid: int) -> float:
        """The scale of client ``cid``'s adapter at its own rank (FLoRA)."""
        from sfedlora.scaling import gamma

        return gamma(self.scaling, self.alpha, self.client_rank(cid),
                     self.clients_per_round)

    @property
    def alpha(self) -> float:
        """alpha of the scaling rule: ``lora.alpha``, else the rule's default."""
        from sfedlora.scaling import default_alpha

        return self.lora.alpha if self.lora.alpha is not None else default_alpha(self.scaling)

    @property
    def server_optimizer(self) -> str:
        from sfedlora.methods import get_method

        return self.server.optimizer or get_method(self.method).server_optimizer

    @property
    def a_init(self) -> str:
        from sfedlora.methods import get_method

        return self.lora.a_init or get_method(self.method).a_init_modes[0]


# --- loading ---------------------------------------------------------------------------


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            paths += _field_paths(ann, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def _format_validation_error(err: ValidationError) -> str:
    known = _field_paths(ExperimentConfig)
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int))
        # pydantic reports union members as extra path parts ('lora.alpha.float'): map
        # such a location onto its field, matching whole dotted parts only, so that a key
        # that merely extends a known one ('local.lrx') is reported as itself.
        if loc not in known:
            loc = next((k for k in known if loc.startswith(k + ".")), loc)
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; remove it"
            lines.append(f"unknown key {loc!r}{hint}")
        elif e["type"] == "value_error" or not loc:
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            lines.append(f"{loc}={e.get('input')!r}: {e['msg']}; fix {loc} in the config")
    return "invalid config: " + " | ".join(dict.fromkeys(lines))


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would ('8' -> 8, 'null' -> None, '[a,b]'),
    and numbers in exponent notation as numbers: YAML 1.1 reads '1e-3' as a string, so
    a sweep's ladder 1e-3,1e-2 would be sorted and grouped as text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a nested dict (in place, also returned)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node = child
        node[leaf] = _parse_value(value)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML config (or the defaults: the offline main job) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
    apply_overrides(raw, list(overrides))
    return validate(raw)


def validate(raw: dict[str, Any]) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
