"""The experiment config's schema: sections, fields, rules that span fields, and the
values derived from them (resolved in one place so every runtime agrees). Rules and
defaults that concern one method or task are theirs (``Method.check_config``,
``Task.check_config``, ``Method.traits``, ...): :func:`sfedlora.config.resolve`
applies them, since this layer sits below the methods and tasks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from sfedlora.core.codecs import Codec
from sfedlora.core.scaling import default_alpha, gamma
from sfedlora.settings.datasets import DATASETS
from sfedlora.settings.errors import ConfigError


@dataclass(frozen=True)
class Defaults:
    """What a config falls back on where a setting is unset: its method's and task's
    defaults (filled in by :func:`sfedlora.config.resolve`)."""

    scaling: str  # lora.scaling
    server_optimizer: str  # server.optimizer
    a_init: str  # lora.a_init
    comm: dict[str, dict] = field(default_factory=dict)  # comm.up / comm.down presets
    model_name: str = ""  # model.name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClientsConfig(_Section):
    num: int = Field(10, gt=0, description="number of clients")
    per_round: int | float | Literal["all"] = Field(
        "all", description="clients per round: 'all', a count, or a fraction in (0, 1]"
    )
    min_clients: int = Field(1, gt=0, description="replies a round needs to aggregate")
    state_store: Literal["memory", "disk", "auto"] = Field(
        "auto", description="where clients' private state lives between rounds: memory, "
        "or one file per client and round under the run directory (auto: disk above "
        "clients.state_store_threshold clients)")
    state_store_threshold: int = Field(
        1000, gt=0, description="above this many clients, state_store=auto keeps client state on "
        "disk")
    world_size: int = Field(
        1, gt=0, description="processes that train each client together: every local "
        "step's batch is split across them and their gradients summed (gloo on the CPU, "
        "NCCL on GPUs, rank r on cuda:r); the update is the one-process update for the "
        "same batch")
    parallel: int = Field(
        1, gt=0, description="clients trained at once on the one model of the in-process "
        "runtime: their batches go through the frozen base as one batch and each client's "
        "adapter acts on its own rows; the results are the one-at-a-time results "
        "(methods whose client stage works on the model train one at a time)")


class LocalConfig(_Section):
    steps: int | None = Field(5, gt=0, description="local optimizer steps per round")
    epochs: int | None = Field(None, gt=0, description="local epochs (instead of steps)")
    batch_size: int = Field(
        16, gt=0, description="examples per local step")
    optimizer: Literal["sgd", "adamw"] = Field(
        "adamw", description="the clients' local optimizer")
    lr: float = Field(
        5e-4, gt=0, description="learning rate of the adapter (A and B; see lr_A, lr_B, head_lr)")
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
    momentum: float = Field(
        0.0, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(
        0.0, ge=0, description="decoupled weight decay of the local optimizer")
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning-rate schedule over all rounds' local steps")
    keep_optimizer_state: bool = Field(
        False, description="keep each client's optimizer state across rounds"
    )
    max_grad_norm: float | None = Field(
        None, gt=0, description="clip each local step's gradient to this L2 norm (None: no "
        "clipping)")


class LoraConfig(_Section):
    adapter: Literal["lora", "vera"] = Field(
        "lora", description="lora, or vera (PEFT's VeRA: frozen shared random projections, "
        "trained scaling vectors lambda_d and lambda_b; with fedsa: FedSA-VeRA)"
    )
    rank: int = Field(
        8, gt=0, description="LoRA rank r (with client_ranks: the server's r_max)")
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
    dropout: float = Field(
        0.0, ge=0, lt=1, description="LoRA dropout on the adapter's input")


class ModelConfig(_Section):
    name: str | None = Field(
        None, description="hub name, local path or offline asset (None: the task's "
        "offline default, all-MiniLM-L6-v2 or SmolLM2-135M-Instruct)"
    )
    max_length: int = Field(
        128, gt=0, description="tokens per example (longer texts are truncated)")
    padding: Literal["longest", "max_length"] = Field(
        "longest", description="classification batches: padded to their longest sequence, "
        "or always to max_length (every batch the same shape and cost, e.g. to time runs "
        "that train different examples)")
    load_in_4bit: bool = Field(False, description="QLoRA base weights (CUDA + bitsandbytes)")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, or auto")


class DataConfig(_Section):
    source: Literal["bbc", "named", "files", "hf"] = Field(
        "bbc", description="bbc: BBC News from its offline package; named: a dataset "
        "named by data.dataset, read from the data directory (the default when "
        "data.dataset is set); files: data.train_path/test_path; hf: the Hugging Face Hub"
    )
    train_path: str | None = Field(
        None, description="source=files: the training file (.csv, .tsv or .jsonl)")
    test_path: str | None = Field(
        None, description="source=files: the global test file (None: a stratified split of the "
        "training file)")
    dataset: str | None = Field(
        None, description="source=named: one of " + ", ".join(DATASETS) + " (files in "
        "$SFEDLORA_DATA/<name>/, fetched by `sfedlora data get <name>`); source=hf: the "
        "Hub dataset id, e.g. glue"
    )
    subset: str | None = Field(None, description="HF dataset config, e.g. sst2")
    train_split: str = Field(
        "train", description="source=hf: the split clients train on")
    test_split: str | None = Field("validation", description="HF split used as global test")
    text_column: str = Field(
        "text", description="the column holding the text")
    label_column: str = Field(
        "label", description="the column holding the label (strings or integers)")
    prompt_column: str = Field("question", description="causal-lm: the instruction/prompt")
    response_column: str = Field("answer", description="causal-lm: the target response")
    input_column: str | None = Field(
        None, description="causal-lm: optional extra input appended to the prompt (Alpaca)"
    )
    packing: bool = Field(False, description="causal-lm: pack examples into full blocks")
    partition: Literal["iid", "dirichlet", "classes", "size"] = Field(
        "dirichlet", description="how examples are split over clients: iid, dirichlet (label "
        "skew), classes (each client gets classes_per_client labels) or size (causal-lm: skewed "
        "sizes)")
    dirichlet_alpha: float = Field(
        0.5, gt=0, description="partition=dirichlet: concentration; smaller is more skewed")
    classes_per_client: int = Field(
        2, gt=0, description="partition=classes: labels per client")
    min_partition_size: int = Field(
        10, ge=0, description="partition=dirichlet: redraw until every client holds at least this "
        "many examples (0: allow empty clients)")
    client_test_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of each client's examples kept as its own test part "
        "(same label mix)")
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
    global_test_fraction: float = Field(
        0.2, gt=0, lt=1, description="without a test file: share of the data kept apart as the "
        "global test set")
    max_train_examples: int | None = Field(
        None, gt=0, description="use at most this many training examples (a seeded subset, before "
        "partitioning)")
    max_test_examples: int | None = Field(
        None, gt=0, description="use at most this many global test examples (a seeded "
        "subset)")

    @model_validator(mode="before")
    @classmethod
    def _name_a_dataset(cls, data: Any) -> Any:
        """``data.dataset: sst2`` alone means the named dataset, with its columns
        wherever the config does not set them."""
        if not isinstance(data, dict) or data.get("dataset") is None:
            return data
        data = dict(data)
        data.setdefault("source", "named")
        spec = DATASETS.get(data["dataset"]) if data["source"] == "named" else None
        for key, column in (spec.columns.items() if spec else ()):
            data.setdefault(key, column)
        return data

    @model_validator(mode="after")
    def _check_source(self) -> DataConfig:
        if self.source == "named":
            if self.dataset not in DATASETS:
                raise ValueError(
                    f"data.dataset={self.dataset!r} is not a dataset sfedlora names; use one "
                    f"of {', '.join(DATASETS)}, data.source=hf for a Hugging Face Hub id, or "
                    "data.source=files with data.train_path")
            if self.train_path or self.test_path:
                raise ValueError(
                    f"data.dataset={self.dataset!r} names its files; remove data.train_path "
                    "and data.test_path, or set data.source=files to read those instead")
        elif self.dataset is not None and self.source in ("bbc", "files"):
            raise ValueError(
                f"data.dataset={self.dataset!r} with data.source={self.source!r}: remove "
                "data.source to read the named dataset, or remove data.dataset")
        return self


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
    max_new_tokens: int = Field(
        256, gt=0, description="causal-lm: most tokens a generated answer may have")
    few_shot: int = Field(0, ge=0, description="causal-lm: solved training examples in the prompt")
    batch_size: int = Field(
        64, gt=0, description="examples per evaluation batch")
    probe_size: int = Field(16, gt=0, description="examples in the fixed probe batch")
    clients: Literal["all"] | int = Field(
        "all", description="all, or K: score a fixed seeded subset of K clients for the "
        "personalised figures (and, for methods without a global adapter, the global "
        "ones); metrics.jsonl lists them as eval_clients, and only their adapters are "
        "exported. The global adapter's figures do not change")


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
    weighting: Literal["examples", "uniform"] = Field(
        "examples", description="for methods that weight clients by their training "
        "examples: by them (examples) or equally (uniform, as FedEx-LoRA's official code "
        "does); methods that average uniformly or by other weights are unaffected")
    lr: float = Field(1e-3, gt=0, description="server optimizer learning rate")
    weight_decay: float = Field(0.01, ge=0, description="server AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="server AdamW betas")


class CodecConfig(_Section):
    """How one direction's messages are encoded (:mod:`sfedlora.core.codecs`). Unset fields
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
        "when the codec is lossy). Downloads: send each client the change since the "
        "state it holds, server and client agreeing bit for bit (sfedlora.comm.downlink)"
    )
    error_feedback: bool | None = Field(
        None, description="uploads: keep what a message lost and add it to the next one"
    )
    per_tensor: bool | None = Field(
        None, description="top-k within each tensor (A and B each keep the density) "
        "instead of over the whole message")


class CommConfig(_Section):
    up: CodecConfig = CodecConfig()
    down: CodecConfig = CodecConfig()
    down_history: int = Field(
        16, gt=0, description="with comm.down.delta: published versions the server keeps "
        "so a client absent that many rounds catches up by their changes; older: a full "
        "copy")


class PrivacyConfig(_Section):
    """Client-level differential privacy (DP-FedAvg: clip, average, add noise) and
    secure aggregation (the server learns only the sum of the uploads)."""

    enabled: bool = Field(
        False, description="client-level differential privacy (clipping, Gaussian noise, secret "
        "Poisson sampling)")
    clip_norm: float = Field(1.0, gt=0, description="L2 bound on each client's update")
    noise_multiplier: float = Field(1.0, ge=0, description="noise std / clip_norm")
    delta: float = Field(
        1e-5, gt=0, lt=1, description="the delta of the reported (epsilon, delta)-DP guarantee")
    secure_aggregation: bool = Field(
        False, description="mask every upload so the server learns only their sum "
        "(Bonawitz et al. 2017; sfedlora.privacy.secagg)")
    secagg_threshold: float = Field(
        2 / 3, gt=0, le=1, description="shares needed to unmask, as a fraction of the "
        "round's clients, never below a strict majority (floor(n/2) + 1) or 2: fewer "
        "survivors and the round is skipped")
    secagg_range: float = Field(
        1.0, gt=0, description="uploaded values are clipped to [-range, range] before "
        "quantisation (clipped coordinates are counted in the client's log)")
    secagg_max_weight: int = Field(
        4096, gt=0, description="the most training examples a client may have where "
        "clients are weighted by them; with the range and the round's clients it sets the "
        "quantisation step (uniform weights and DP use 1)")


class CheckpointConfig(_Section):
    every: int = Field(1, ge=0, description="write a checkpoint every k rounds; 0: only on Ctrl-C")


class NetworkConfig(_Section):
    """A simulated network that prices each round in seconds and joules
    (:mod:`sfedlora.comm.network`); ``model: none`` counts bytes only."""

    model: Literal["none", "wireless"] = Field(
        "none", description="none: bytes only; wireless: an FDMA uplink with path loss "
        "and Rayleigh fading, a broadcast downlink, and local compute time")
    bandwidth_hz: float = Field(20e6, gt=0, description="uplink band shared by a round's "
                                "clients")
    tx_power_dbm: float = Field(23.0, ge=-30, le=50, description="each client's transmit "
                                "power")
    noise_dbm_per_hz: float = Field(-174.0, description="noise power spectral density")
    cell_radius_m: float = Field(500.0, gt=10, description="clients are placed uniformly "
                                 "in a disc of this radius (at least 10 m from its centre)")
    downlink_bps: float = Field(100e6, gt=0, description="broadcast downlink rate")
    client_tflops: tuple[float, float] = Field(
        (1.0, 10.0), description="[lo, hi]: each client's compute speed, drawn once, "
        "uniformly")
    allocation: Literal["equal", "min_max"] = Field(
        "equal", description="equal: the band split evenly; min_max: the split that "
        "equalises the clients' finish times (bisection)")

    @field_validator("client_tflops")
    @classmethod
    def _speed_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0 < lo <= hi:
            raise ValueError(f"network.client_tflops={list(value)}: give [lo, hi] with "
                             "0 < lo <= hi, e.g. [1, 10]")
        return value


class ClientResources(_Section):
    """What Flower's simulation engine reserves for each ClientApp worker (Ray actor)."""

    num_cpus: float = Field(1.0, gt=0, description="CPU cores per worker")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per worker: 0.25 lets four "
                            "workers share one GPU, 1 gives each its own (needs model.device "
                            "cuda or auto)")


class FlowerConfig(_Section):
    """The Flower runtime (``sfedlora.runtime.flower``); ignored by the in-process simulator."""

    client_resources: ClientResources = ClientResources()
    ray_address: str | None = Field(
        None, description="join this running Ray cluster (auto, or host:port of the head "
        "started with `ray start --head`) instead of starting Ray on this machine, so the "
        "simulation's workers spread over every machine of the cluster")

    virtual_nodes: int | None = Field(
        None, gt=0, description="simulation engine only: how many virtual SuperNodes "
        "(null: one per client). Every virtual node serves whichever client a message "
        "names, so fewer nodes than clients run the same experiment; flwr 1.41's engine "
        "polls every node several times a second, which costs CPU time at 10,000 nodes")
    round_timeout: float | None = Field(
        300.0, gt=0, description="seconds the server waits for a round's replies; clients "
        "that have not replied by then count as dropped (null: wait forever)")
    connect_timeout: float = Field(
        120.0, gt=0, description="seconds the server waits for clients.num nodes to connect")
    inbox_log: str | None = Field(
        None, description="append a line per message the ServerApp receives to this JSONL "
        "file: its records' keys and its tensors' names and shapes, never their values, so "
        "a reviewer can check what reached the server. It records which nodes replied: "
        "under privacy.enabled keep it as secret as the checkpoint")


# sections that became method options (see ExperimentConfig._legacy_method_sections)
LEGACY_SECTIONS = ("soft", "tsfa", "personal")
LEGACY_OPTIONS = "__sections__"


class ExperimentConfig(_Section):
    task: str = Field("classification", description="classification or causal-lm "
                      "(sfedlora.tasks.TASKS)")
    method: str = Field("sfed", description="a registered method (sfedlora.methods.REGISTRY), "
                        "or the import path package.module:Class of your own Method subclass")
    seed: int = Field(
        0, description="seeds the partition, initialisation, sampling and batches (never DP noise)")
    rounds: int = Field(
        10, gt=0, description="federated rounds")
    clients: ClientsConfig = ClientsConfig()
    local: LocalConfig = LocalConfig()
    lora: LoraConfig = LoraConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    server: ServerConfig = ServerConfig()
    comm: CommConfig = CommConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    flower: FlowerConfig = FlowerConfig()
    network: NetworkConfig = NetworkConfig()
    options: dict[str, Any] = Field(
        {}, description="the method's own settings, validated by the method's Options "
        "model (e.g. method=fedsvd takes options.train_head, method=soft options.keep); "
        "an unknown one is refused with the list the method takes")
    output_dir: str | None = Field(
        None, description="where the run is written; None: a new directory "
        "runs/<UTC time>-<method>, with runs/latest pointing at the newest. A directory "
        "holding another run is refused (sfedlora run --overwrite replaces it)")
    progress: bool = Field(
        True, description="show a progress bar")

    def _check_flower_resources(self) -> None:
        gpus = self.flower.client_resources.num_gpus
        if gpus > 0 and self.model.device == "cpu":
            raise ValueError(
                f"flower.client_resources.num_gpus={gpus} reserves GPUs for each worker but "
                "model.device=cpu keeps the model off them; set model.device=cuda (or auto), "
                "or flower.client_resources.num_gpus=0")
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(
                f"flower.client_resources.num_gpus={gpus}: a worker takes a fraction of one "
                "GPU or a whole number of GPUs; use e.g. 0.5, 1 or 2")

    @model_validator(mode="before")
    @classmethod
    def _legacy_method_sections(cls, data: Any) -> Any:
        """Configs written before the methods owned their settings had sections
        ``soft``, ``tsfa`` and ``personal`` (every saved config.yaml spells them out):
        they are kept under ``options`` as :data:`LEGACY_OPTIONS`, and
        :func:`sfedlora.config.resolve` gives the method the keys its Options model
        takes (the others never applied to it)."""
        if isinstance(data, dict) and any(k in data for k in LEGACY_SECTIONS):
            data = dict(data)
            legacy = {k: data.pop(k) for k in LEGACY_SECTIONS if k in data}
            data["options"] = {**(data.get("options") or {}), LEGACY_OPTIONS: legacy}
        return data

    @model_validator(mode="after")
    def _combinations(self) -> ExperimentConfig:
        """The checks that need no method or task (those are :meth:`check_with`)."""
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
        if self.eval.clients != "all" and not 0 < self.eval.clients <= c.num:
            raise ValueError(
                f"eval.clients={self.eval.clients} must be between 1 and clients.num={c.num} "
                "(or all)")
        if c.min_clients > self.clients_per_round:
            raise ValueError(
                f"clients.min_clients={c.min_clients} exceeds the {self.clients_per_round} "
                "clients sampled per round; lower it or raise clients.per_round"
            )
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
        named = DATASETS.get(data.dataset) if data.source == "named" else None
        if named is not None and named.task != self.task:
            raise ValueError(f"data.dataset={data.dataset!r} is {named.task} data and task="
                             f"{self.task!r}; set task={named.task} or choose another dataset")
        if self.privacy.enabled and not self.privacy.secure_aggregation and c.min_clients > 1:
            raise ValueError(
                f"privacy.enabled with clients.min_clients={c.min_clients}: under DP the "
                "server releases the noised sum every round, however few clients took part "
                "(skipping a round would reveal how many did, which the accountant does not "
                "cover); set clients.min_clients=1"
            )
        if self.privacy.enabled and self.server.aggregation != "mean":
            raise ValueError(
                f"privacy.enabled with server.aggregation={self.server.aggregation!r}: the "
                "privacy accounting assumes a mean of clipped updates; set server.aggregation=mean"
            )
        net = self.network
        changed = sorted(f"network.{k}" for k, info in NetworkConfig.model_fields.items()
                         if k != "model" and getattr(net, k) != info.default)
        if net.model == "none" and changed:  # a saved config spells out the defaults
            raise ValueError(f"{', '.join(changed)} set with network.model=none, which "
                             "counts bytes only; set network.model=wireless or remove them")
        if c.parallel > 1 and c.world_size > 1:
            raise ValueError(
                f"clients.parallel={c.parallel} with clients.world_size={c.world_size}: a "
                "client spread over processes trains alone; set one of them to 1")
        self._check_flower_resources()
        return self

    def check_with(self, method, task, vera_methods: list[str]) -> None:
        """The checks that need this config's method and task (their objects, passed
        in by :func:`sfedlora.config.resolve`: the settings layer sits below both).
        Raises ``ValueError`` naming the setting and the fix."""
        if self.lora.a_init is not None and len(method.traits.a_init_modes) < 2:
            raise ValueError(
                f"lora.a_init={self.lora.a_init!r} does not apply to method {self.method!r}, "
                f"which has no such choice ({method.traits.a_init_note}); remove lora.a_init"
            )
        if self.lora.adapter == "vera":
            self._check_vera(method, vera_methods)
        if self.lora.client_ranks is not None:
            self._check_client_ranks(method)
        if self.privacy.enabled and self.a_init == "independent":
            raise ValueError(
                "privacy.enabled with lora.a_init=independent: each client's first A is its "
                "own random draw, so whether it took part shows in the released mean beyond "
                "what clipping its change can bound; set lora.a_init=shared"
            )
        self._check_codecs(method)
        if self.privacy.secure_aggregation:
            self._check_secure_aggregation(method)
        task.check_config(self)
        method.check_config(self)

    def _check_secure_aggregation(self, method) -> None:
        """Secure aggregation gives the server only the weighted sum of what clients
        send: refuse whatever needs an individual update."""
        refused = [
            (method.traits.secure_aggregation_refusal, "method",
             f"method={self.method} {method.traits.secure_aggregation_refusal}"),
            (self.server.aggregation != "mean", "server.aggregation",
             "a median or trimmed mean needs every update; use mean"),
            (self.server.max_update_norm is not None, "server.max_update_norm",
             "the server cannot measure a masked update; remove it"),
            (self.server.clip_norm is not None, "server.clip_norm",
             "the server cannot clip a masked update; with privacy.enabled clients clip "
             "their own change (privacy.clip_norm); remove server.clip_norm"),
            (self.clients_per_round < 2, "clients.per_round",
             "the sum of one upload is that upload; sample at least 2 clients"),
        ]
        for bad, setting, why in refused:
            if bad:
                raise ValueError(f"privacy.secure_aggregation with this {setting}: {why}")

    def _check_client_ranks(self, method) -> None:
        ranks, num = self.lora.client_ranks, self.clients.num
        if not method.traits.mixed_ranks:
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

    def _check_vera(self, method, vera_methods: list[str]) -> None:
        if not method.traits.vera:
            names = ", ".join(vera_methods)
            raise ValueError(
                f"lora.adapter=vera with method={self.method!r}: VeRA's projections are "
                f"frozen and shared, so only {names} apply to it (fedsa is FedSA-VeRA); "
                "choose one of them or lora.adapter=lora"
            )
        for key in ("scaling", "a_init"):
            if getattr(self.lora, key) is not None:
                raise ValueError(
                    f"lora.{key} does not apply to lora.adapter=vera (VeRA has no LoRA scale "
                    f"and its projections come from one seed); remove lora.{key}"
                )

    @staticmethod
    def refuse_with(setting: str, refused: list[tuple[bool, str, str]]) -> None:
        """Raise naming ``setting``, the first other setting it cannot go with, and why."""
        for bad, other, why in refused:
            if bad:
                raise ValueError(f"{setting} does not work with {other}: {why}; remove one "
                                 "of them")

    def _check_codecs(self, method) -> None:
        down = self.comm.down
        if down.error_feedback:
            raise ValueError(
                "comm.down.error_feedback: delta downloads (comm.down.delta) already carry "
                "what a message dropped into later ones; remove it"
            )
        if down.delta:
            self.refuse_with("comm.down.delta", [
                (self.lora.client_ranks is not None, "lora.client_ranks",
                 "every client then holds a truncation of its own"),
                (self.privacy.secure_aggregation, "privacy.secure_aggregation",
                 "masks are computed against the download as one message"),
                (bool(method.traits.comm.get("down")), f"method={self.method}",
                 "its downloads are compressed by design (its comm.down preset)"),
            ])
        up = self.codec("up")
        if not up.error_feedback:
            return
        if not any(method.plan(r).upload for r in (1, 2)):
            raise ValueError(
                f"comm.up.error_feedback with method {self.method!r}, which sends nothing "
                "up; remove comm.up.error_feedback"
            )
        if up.lossless and not method.traits.chooses_upload_positions:
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

    # Derived values, resolved in one place so every runtime agrees on them. Those that
    # fall back on the method's or task's defaults read them from the Defaults that
    # sfedlora.config.resolve attaches (this layer sits below methods and tasks).
    _resolved: Defaults | None = PrivateAttr(None)

    def with_defaults(self, defaults: Defaults) -> ExperimentConfig:
        """A copy that falls back on ``defaults`` where a setting is left unset."""
        out = self.model_copy()
        out._resolved = defaults
        return out

    @property
    def is_resolved(self) -> bool:
        return self._resolved is not None

    def _defaults(self) -> Defaults:
        if self._resolved is None:
            raise ConfigError(
                "this config was not resolved against its method and task: load it with "
                "sfedlora.config.load_config or sfedlora.config.validate (or pass it "
                "through sfedlora.config.resolve)")
        return self._resolved

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
    def sample_rate(self) -> float:
        """q = N / clients.num: each client's chance of taking part in a round (under
        DP, where clients are Poisson-sampled, exactly; otherwise the fixed share)."""
        return self.clients_per_round / self.clients.num

    @property
    def model_name(self) -> str:
        if self.model.name:
            return self.model.name
        return self._defaults().model_name

    @property
    def scaling(self) -> str:
        return self.lora.scaling or self._defaults().scaling

    def codec(self, direction: Literal["up", "down"]):
        """The resolved codec of a direction: explicit settings, then the method's
        preset, then no compression (uploads use delta coding when lossy)."""
        preset = self._defaults().comm.get(direction, {})
        given = getattr(self.comm, direction).model_dump(exclude_none=True)
        settings = {"density": 1.0, "bits": None, "dtype": "fp32", **preset, **given}
        probe = Codec(**{k: v for k, v in settings.items() if k in ("density", "bits", "dtype")})
        settings.setdefault("delta", direction == "up" and not probe.lossless)
        settings.setdefault("error_feedback", False)
        settings.setdefault("per_tensor", False)
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
        return gamma(self.scaling, self.alpha, self.client_rank(cid),
                     self.clients_per_round)

    @property
    def gamma(self) -> float | None:
        """The LoRA scale at ``lora.rank`` (None for VeRA, which has none)."""
        if self.lora.adapter == "vera":
            return None
        return gamma(self.scaling, self.alpha, self.lora.rank, self.clients_per_round)

    @property
    def alpha(self) -> float:
        """alpha of the scaling rule: ``lora.alpha``, else the rule's default."""
        return self.lora.alpha if self.lora.alpha is not None else default_alpha(self.scaling)

    @property
    def server_optimizer(self) -> str:
        return self.server.optimizer or self._defaults().server_optimizer

    @property
    def a_init(self) -> str:
        return self.lora.a_init or self._defaults().a_init
