"""Hugging Face interchange: `save_hf` / `load_hf` write and read BERT in transformers' layout.

A support module: the paper can be followed without it. config.json with HF's field names and
a state dict with HF's key names, without depending on `transformers` (tests compare the logits
with transformers' own BertForMaskedLM when it is installed).
"""
import json
import os

import torch

from .model import BertConfig, BertForMaskedLM

HF_CONFIG_NAMES = {  # ours -> transformers.BertConfig
    "vocab_size": "vocab_size", "n_layer": "num_hidden_layers", "hidden": "hidden_size",
    "n_head": "num_attention_heads", "intermediate": "intermediate_size",
    "max_position": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
    "dropout": "hidden_dropout_prob", "layer_norm_eps": "layer_norm_eps",
    "initializer_range": "initializer_range",
}
HF_LAYER_NAMES = {  # our module in Layer -> HF's module in bert.encoder.layer.{i}
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "inter": "intermediate.dense", "out": "output.dense", "out_norm": "output.LayerNorm",
}
HF_OTHER_NAMES = {  # our module in BertForMaskedLM -> HF's module in transformers.BertForMaskedLM
    "bert.emb.word": "bert.embeddings.word_embeddings",
    "bert.emb.position": "bert.embeddings.position_embeddings",
    "bert.emb.token_type": "bert.embeddings.token_type_embeddings",
    "bert.emb.norm": "bert.embeddings.LayerNorm",
    "transform": "cls.predictions.transform.dense",
    "transform_norm": "cls.predictions.transform.LayerNorm",
}


def hf_key_names(config):
    """Map every key of our BertForMaskedLM state dict to its name in HF's layout."""
    names = {"decoder_bias": "cls.predictions.bias"}
    modules = dict(HF_OTHER_NAMES)
    for i in range(config.n_layer):
        for ours, theirs in HF_LAYER_NAMES.items():
            modules[f"bert.layers.{i}.{ours}"] = f"bert.encoder.layer.{i}.{theirs}"
    for ours, theirs in modules.items():
        names[f"{ours}.weight"] = f"{theirs}.weight"
        if not ours.startswith("bert.emb.") or ours == "bert.emb.norm":
            names[f"{ours}.bias"] = f"{theirs}.bias"
    return names


def save_hf(model, directory):
    """Write `config.json` and `pytorch_model.bin` loadable by transformers.BertForMaskedLM."""
    config = model.config
    if config.pre_norm:
        raise ValueError("a pre-LayerNorm model has no Hugging Face BERT equivalent; train with pre_norm=False")
    if config.alibi:
        raise ValueError("an ALiBi model has no Hugging Face BERT equivalent (transformers' BERT has no distance "
                         "bias); train with alibi=False")
    os.makedirs(directory, exist_ok=True)
    hf_config = {theirs: getattr(config, ours) for ours, theirs in HF_CONFIG_NAMES.items()}
    hf_config.update(architectures=["BertForMaskedLM"], model_type="bert", hidden_act="gelu",
                     attention_probs_dropout_prob=config.dropout, pad_token_id=0,
                     position_embedding_type="absolute", tie_word_embeddings=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    names = hf_key_names(config)
    state = {names[k]: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]  # tied
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))


def read_safetensors(path):
    """Minimal reader of the safetensors format (8-byte header size, JSON header, raw tensors)."""
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header, data = json.loads(f.read(n)), f.read()
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[start:end]), dtype=dtypes[info["dtype"]]) if end > start \
            else torch.empty(0, dtype=dtypes[info["dtype"]])
        state[name] = t.reshape(info["shape"]).float()
    return state


def load_hf(directory):
    """Read a Hugging Face BERT directory (ours or one written by transformers) into BertForMaskedLM."""
    with open(os.path.join(directory, "config.json")) as f:
        hf_config = json.load(f)
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{directory}: hidden_act {hf_config['hidden_act']!r} is not BERT's exact gelu")
    config = BertConfig(**{ours: hf_config[theirs] for ours, theirs in HF_CONFIG_NAMES.items()})
    bin_path, st_path = os.path.join(directory, "pytorch_model.bin"), os.path.join(directory, "model.safetensors")
    if os.path.exists(st_path):
        state = read_safetensors(st_path)
    elif os.path.exists(bin_path):
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory}: neither model.safetensors nor pytorch_model.bin")
    model = BertForMaskedLM(config)
    ours = {}
    for our_key, hf_key in hf_key_names(config).items():
        if hf_key not in state:
            raise KeyError(f"{directory}: missing {hf_key} (not a BERT masked-LM checkpoint?)")
        ours[our_key] = state[hf_key]
    model.load_state_dict(ours)
    return model
