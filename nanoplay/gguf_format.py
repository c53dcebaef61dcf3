"""
GPT-2 models in GGUF, the file format of llama.cpp and the tools built on it, through the `gguf`
package that the llama.cpp project maintains (writer, reader, tensor names, quantization).

Writing follows llama.cpp's own GPT-2 conversion (convert_hf_to_gguf.py, class GPT2Model, and
llama.cpp's src/models/gpt2.cpp, which reads the file):

- metadata: general.architecture `gpt2`; gpt2.context_length, embedding_length, feed_forward_length,
  block_count, attention.head_count, attention.layer_norm_epsilon; general.file_type;
- tensors named by gguf's TensorNameMap (token_embd, position_embd, blk.N.attn_qkv, ..., output_norm,
  and `output` only for an untied head: llama.cpp uses token_embd when it is absent). Our weights are
  nn.Linear's (out, in), the layout the converter transposes transformers' Conv1D weights into, so they
  go as they are. llama.cpp's GPT-2 requires every bias: a bias=False model gets zero biases;
- types as the converter chooses them: 1-D tensors (norms, biases) and position embeddings stay F32,
  the matrices take the file type (F16, or Q8_0 where a row is whole 32-value blocks, else F16);
- tokenizer.ggml.*: model `gpt2`, pre-tokenizer `gpt-2`, GPT-2's tokens (byte-level strings, as in
  vocab.json) and merges, <|endoftext|> as bos/eos and added before each text (nanoplay conditions
  every text on it, see engine.text_context); a padded vocabulary's extra ids are `[PADn]` UNUSED
  tokens, or, for a chat model, the chat special tokens (CONTROL) and its chat template.

llama.cpp's `gpt2` graph computes the tanh GELU. A model trained with the exact GELU (nanoGPT's) is
written with a `nanoplay.activation` key, which nanoplay honours when reading and llama.cpp ignores
(`llama_cpp_note` says so). Other activations and attention scalings are refused.

Reading takes any GPT-2 GGUF (ours, llama.cpp's conversions of GPT-2 checkpoints) in any tensor type
gguf can dequantize (F32, F16, BF16, Q8_0, Q4_0, ...): every architecture detail comes from the file's
metadata and tensor shapes, or the file is refused with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from .atomic import write_file_atomically
from .chat import CHAT_TEMPLATE, stop_token_ids
from .errors import NanoplayError
from .export import check_parent_folder, check_vocabulary, gpt2_bpe_file, writing
from .model import GPT, GPTConfig
from .tokenizer import EOT_ID, GPT2_VOCAB_SIZE, SPECIAL_TOKENS

ARCH = "gpt2"
ACTIVATION_KEY = "nanoplay.activation"  # ours: the MLP activation, where it is not llama.cpp's tanh GELU
LLAMA_CPP_ACTIVATION = "gelu_tanh"  # what llama.cpp's gpt2 graph computes (ggml_gelu)
# --gguf-type -> (general.file_type, the weight matrices' tensor type), named as llama.cpp's converter names them
FILE_TYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "q8_0": ("MOSTLY_Q8_0", "Q8_0")}


def write_gguf(model: GPT, path: Path, file_type: str = "f32", *, chat_template: str | None = None,
               name: str | None = None) -> Path:
    """
    Write `model` to `path` (a `.gguf` file name) for llama.cpp, atomically: a temporary file in the same
    folder renamed into place, replacing an earlier GGUF file there. `file_type`: "f32" (exact), "f16" or
    "q8_0" (llama.cpp's 8-bit blocks of 32 values with an F16 scale). `chat_template`: the model's
    (LoadedModel.chat_template). `name` goes into general.name. Returns the resolved path.
    Raises NanoplayError for what llama.cpp's GPT-2 cannot compute, a target that is not a new or GGUF
    file, or an unwritable path.
    """
    if file_type not in FILE_TYPES:
        raise NanoplayError(f"GGUF type {file_type!r}: choose one of {', '.join(FILE_TYPES)}")
    path = gguf_target(path)
    cfg = model.config
    refuse_unsupported(cfg)
    stop_token_ids(chat_template)  # refuses a chat template nanoplay does not know
    check_vocabulary(cfg.vocab_size, chat_template)
    ftype, wanted = gguf.LlamaFileType[FILE_TYPES[file_type][0]], gguf.GGMLQuantizationType[FILE_TYPES[file_type][1]]

    def write(tmp: Path):
        writer = gguf.GGUFWriter(tmp, arch=ARCH)
        if name:
            writer.add_name(name)
        writer.add_context_length(cfg.block_size)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(cfg.mlp_width)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
        writer.add_file_type(ftype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if cfg.activation != LLAMA_CPP_ACTIVATION:
            writer.add_string(ACTIVATION_KEY, cfg.activation)
        _add_tokenizer(writer, cfg.vocab_size, chat_template)
        for gguf_name, array in _tensors(model):
            qtype = wanted
            if array.ndim == 1 or gguf_name.startswith("position_embd."):
                qtype = gguf.GGMLQuantizationType.F32
            try:
                data = gguf.quants.quantize(array, qtype)
            except gguf.QuantError:  # rows that are not whole Q8_0 blocks: F16, as llama.cpp's converter does
                qtype = gguf.GGMLQuantizationType.F16
                data = gguf.quants.quantize(array, qtype)
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    with writing(path):
        write_file_atomically(path, write)
    return path


def refuse_unsupported(cfg: GPTConfig) -> None:
    """What llama.cpp's GPT-2 graph cannot compute is refused rather than written to give other logits."""
    if cfg.activation not in (LLAMA_CPP_ACTIVATION, "gelu"):
        raise NanoplayError(f"the model's MLP activation is {cfg.activation}; llama.cpp's GPT-2 computes the "
                            "tanh GELU, so it cannot run this model: no GGUF written")
    if not cfg.scale_attn_weights or cfg.scale_attn_by_inverse_layer_idx:
        raise NanoplayError("the model scales attention other than by 1/sqrt(head size); llama.cpp's GPT-2 "
                            "cannot run it: no GGUF written")


def llama_cpp_note(cfg: GPTConfig) -> str | None:
    """What a user should know about running this model's GGUF in llama.cpp, if anything."""
    if cfg.activation == "gelu":
        return ("this model uses the exact GELU; llama.cpp's GPT-2 computes the tanh approximation, so its logits "
                "there differ slightly (on the demo model by 4e-4 on average, at most 5e-3); nanoplay reads the "
                "file back with the exact GELU")
    return None


def gguf_target(path: Path) -> Path:
    """The file to write: a new `.gguf` file, or an earlier GGUF file (replaced). Anything else is refused."""
    path = Path(path).expanduser().resolve()
    if path.suffix != ".gguf":
        raise NanoplayError(f"{path}: give a file name ending in .gguf (how nanoplay and llama.cpp's tools "
                            "recognise the format)")
    if path.is_dir():
        raise NanoplayError(f"{path} is a folder: give a .gguf file name to export into")
    check_parent_folder(path)
    if path.exists():
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise NanoplayError(f"{path} already exists and is not a GGUF file: give a new file name "
                                    "(only an earlier GGUF file is replaced)")
    return path


def _tensors(model: GPT):
    """(GGUF name, float32 array in nn.Linear layout) for every tensor llama.cpp's GPT-2 reads."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, model.config.n_layer)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # llama.cpp takes the output head from token_embd when `output` is absent
    for module_name, module in model.named_modules():  # llama.cpp requires biases: zero for bias=False
        if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and module is not model.lm_head:
            state.setdefault(f"{module_name}.bias", torch.zeros(module.weight.shape[0]))
    for ours, tensor in state.items():
        gguf_name = names.get_name(ours, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise NanoplayError(f"internal error: no GGUF name for {ours}")
        yield gguf_name, tensor.numpy()


def _add_tokenizer(writer, vocab_size: int, chat_template: str | None) -> None:
    """GPT-2's BPE as llama.cpp's tokenizer.ggml.* keys (what convert_hf_to_gguf.py's _set_vocab_gpt2 writes)."""
    encoder = json.loads(gpt2_bpe_file("encoder.json"))
    tokens = sorted(encoder, key=encoder.get)
    types = [gguf.TokenType.NORMAL] * len(tokens)
    types[EOT_ID] = gguf.TokenType.CONTROL
    chat_tokens = {i: t for t, i in SPECIAL_TOKENS.items() if i != EOT_ID} if chat_template else {}
    for i in range(GPT2_VOCAB_SIZE, vocab_size):  # a padded vocabulary: the chat tokens, or unused ids
        tokens.append(chat_tokens.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.CONTROL if i in chat_tokens else gguf.TokenType.UNUSED)
    merges = [line for line in gpt2_bpe_file("vocab.bpe").decode().splitlines()[1:] if line]  # after "#version"
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(EOT_ID)
    writer.add_eos_token_id(EOT_ID)
    writer.add_add_bos_token(True)
    if chat_template:
        writer.add_eot_token_id(SPECIAL_TOKENS["<|end|>"])
        writer.add_chat_template(CHAT_TEMPLATE)


# -- reading ------------------------------------------------------------------------------------------


def read_gguf(path: Path) -> tuple[GPTConfig, dict[str, torch.Tensor], dict]:
    """
    A GPT-2 GGUF file -> (GPTConfig, our state dict in float32, meta). meta holds `chat_template` for a
    chat model exported by nanoplay, and `gguf_file_type` (the tensor types found, e.g. "Q8_0+F32").
    Raises NanoplayError, in one line, for a file that is not GGUF, is truncated, is not GPT-2
    architecture, lacks a setting, has a setting nanoplay cannot honour, or whose tokenizer is not
    GPT-2's BPE.
    """
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, ... for damaged or foreign files
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise NanoplayError(f"{path} is not a readable GGUF file ({reason}): it may be truncated; re-download "
                            "or re-export it") from e

    def value(key: str, required: bool = True):
        field = reader.get_field(key)
        if field is None:
            if required:
                raise NanoplayError(f"{path} has no {key}: not a complete GPT-2 GGUF file")
            return None
        return field.contents()

    arch = value("general.architecture")
    if arch != ARCH:
        raise NanoplayError(f"{path} is a {arch!r} model: nanoplay runs GPT-2-architecture models only")
    block_size, n_layer = value(f"{ARCH}.context_length"), value(f"{ARCH}.block_count")
    n_embd, n_head = value(f"{ARCH}.embedding_length"), value(f"{ARCH}.attention.head_count")
    n_inner = _n_inner(value(f"{ARCH}.feed_forward_length"), n_embd)
    # a float32 in the file: its shortest decimal gives back the 1e-5 it was written from
    layer_norm_epsilon = float(str(np.float32(value(f"{ARCH}.attention.layer_norm_epsilon"))))
    n_head_kv = value(f"{ARCH}.attention.head_count_kv", required=False)
    if n_head_kv not in (None, n_head):
        raise NanoplayError(f"{path} has {n_head_kv} key/value heads for {n_head} query heads (grouped-query "
                            "attention): GPT-2 has none; not supported")
    activation = value(ACTIVATION_KEY, required=False) or LLAMA_CPP_ACTIVATION
    if activation not in (LLAMA_CPP_ACTIVATION, "gelu"):
        raise NanoplayError(f"{path}: {ACTIVATION_KEY} {activation!r} is not an activation nanoplay writes to GGUF")

    tensors = {t.name: t for t in reader.tensors}
    missing = [n for n in ("token_embd.weight", "position_embd.weight") if n not in tensors]
    if missing:
        raise NanoplayError(f"{path} has no {missing[0]} tensor: not a complete GPT-2 GGUF file")
    vocab_size = int(tensors["token_embd.weight"].shape[-1])  # ggml's shape, innermost first: (n_embd, vocab)
    chat_template = _check_tokenizer(path, value, vocab_size)
    try:
        config = GPTConfig(
            block_size=block_size, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
            bias=any(n.endswith(".bias") for n in tensors),  # all (llama.cpp's), or none: a mix fails in build_model
            layer_norm_epsilon=layer_norm_epsilon, activation=activation, n_inner=n_inner,
            tie_word_embeddings="output.weight" not in tensors,
        )
    except (TypeError, ValueError) as e:
        raise NanoplayError(f"{path}: {e}") from e
    names = _gguf_names(config)
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise NanoplayError(f"{path} holds tensors GPT-2 has not ({', '.join(unknown[:3])}): not supported")

    state, types = {}, set()
    for name, t in tensors.items():
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        try:
            array = gguf.quants.dequantize(t.data, qtype)
        except NotImplementedError:
            raise NanoplayError(f"{path}: tensor {name} is {qtype.name}, which the gguf package cannot "
                                "dequantize; re-quantize it to F16 or Q8_0") from None
        except ValueError as e:
            raise NanoplayError(f"{path}: tensor {name} is damaged ({e}): re-download or re-export it") from e
        state[names[name]] = torch.from_numpy(np.array(array, dtype=np.float32))  # a copy: the file stays unmapped
        types.add(qtype.name)
    meta = {"gguf_file_type": "+".join(sorted(types))}
    if chat_template:
        meta["chat_template"] = chat_template
    return config, state, meta


def _n_inner(feed_forward_length, n_embd: int) -> int | None:
    """GPTConfig.n_inner for the file's feed_forward_length: None where it is GPT-2's 4 * n_embd."""
    if isinstance(feed_forward_length, list):  # per-layer widths: not a GPT-2
        raise NanoplayError("per-layer feed-forward widths: not a GPT-2 model")
    return None if feed_forward_length == 4 * n_embd else feed_forward_length


def _gguf_names(config: GPTConfig) -> dict[str, str]:
    """GGUF tensor name -> our parameter name, for every parameter a model of `config` has."""
    with torch.device("meta"):
        expected = GPT(config).state_dict().keys()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    return {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in expected}


def _check_tokenizer(path: Path, value, vocab_size: int) -> str | None:
    """The file's tokenizer must be GPT-2's BPE (nanoplay tokenizes with nothing else). Returns the chat
    template when the file is a chat model of nanoplay's (its template and chat tokens), else None."""
    model = value("tokenizer.ggml.model", required=False)
    tokens = value("tokenizer.ggml.tokens", required=False) or []
    encoder = json.loads(gpt2_bpe_file("encoder.json"))
    gpt2_tokens = sorted(encoder, key=encoder.get)
    if model != "gpt2" or tokens[:GPT2_VOCAB_SIZE] != gpt2_tokens:
        what = f"a {model!r} tokenizer" if model != "gpt2" else "a BPE vocabulary other than GPT-2's"
        raise NanoplayError(f"{path} has {what}: nanoplay tokenizes with GPT-2's BPE only")
    if len(tokens) != vocab_size:
        raise NanoplayError(f"{path} has {len(tokens)} tokens for an embedding of {vocab_size} rows: damaged")
    template = value("tokenizer.chat_template", required=False)
    chat_tokens = {t: i for t, i in SPECIAL_TOKENS.items() if i != EOT_ID}
    if template == CHAT_TEMPLATE and all(i < len(tokens) and tokens[i] == t for t, i in chat_tokens.items()):
        return CHAT_TEMPLATE
    return None
