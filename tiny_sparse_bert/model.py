"""A hand-written BERT encoder with masked-LM, token- and sequence-classification heads.

Implements BERT as in Devlin et al. 2019 ("BERT: Pre-training of Deep Bidirectional
Transformers", section 3 and appendix A) and as released in google-research/bert:
learned position embeddings, token-type embeddings, post-LayerNorm residual blocks,
exact GELU, LayerNorm eps 1e-12, and an MLM decoder tied to the word embeddings.
Two named deviations are off in `BertConfig` (train_general.py turns on `alibi`;
docs/differences.md): `pre_norm` (LayerNorm before each block) and `alibi` (a distance bias on the
attention scores, Press et al. 2022).

    from tiny_sparse_bert.model import BertConfig, BertForMaskedLM
    model = BertForMaskedLM(BertConfig(vocab_size=8192))
    logits, loss = model(input_ids, attention_mask, labels=labels)

On a CPU, dropout draws its random numbers more cheaply (`cpu_dropout.Dropout`, the same
distribution); `hf.py` converts to and from Hugging Face's BERT layout.

Shape legend used in comments throughout the package:
    B batch size, T tokens per sequence, C hidden size (H), nh heads (A), hs head size (C // nh),
    V vocabulary size, N number of selected (masked) positions.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu_dropout import Dropout, attend_with_dropout

IGNORE_INDEX = -100  # label of positions that carry no loss (PyTorch's cross_entropy default)


@dataclass
class BertConfig:
    vocab_size: int = 8192          # WordPiece vocabulary size V
    n_layer: int = 4                # number of encoder layers (paper: L)
    hidden: int = 256               # hidden size C (paper: H)
    n_head: int = 4                 # attention heads (paper: A)
    intermediate: int = 1024        # feed-forward inner size (paper: 4H)
    max_position: int = 512         # learned position embeddings
    type_vocab_size: int = 2        # token types (segment A / B)
    dropout: float = 0.1            # hidden and attention-probability dropout
    layer_norm_eps: float = 1e-12   # as in google-research/bert
    initializer_range: float = 0.02 # std of the truncated-normal init in BERT
    pre_norm: bool = False          # NOTE(deviation, off by default): LayerNorm before each block
    alibi: bool = False             # NOTE(deviation, off by default): distance bias on attention, see alibi_bias


class Embeddings(nn.Module):
    """word + learned position + token type, then LayerNorm and dropout (BERT 3, fig. 2)."""

    def __init__(self, config):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden)
        self.position = nn.Embedding(config.max_position, config.hidden)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden)
        self.norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.drop = Dropout(config.dropout)
        self.pre_norm = config.pre_norm

    def forward(self, input_ids, token_type_ids):
        T = input_ids.size(1)
        assert T <= self.position.num_embeddings, f"sequence of {T} tokens > max_position"
        positions = torch.arange(T, device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)  # (B, T, C)
        # with pre-LN every block normalises its own input, so the sum goes in as is
        return self.drop(x if self.pre_norm else self.norm(x))


class Layer(nn.Module):
    """One encoder layer: self-attention and feed-forward, each wrapped in a residual + LayerNorm.

    The six Linear weights below (query, key, value, attn_out, inter, out) are what pruning.py prunes.
    """

    def __init__(self, config):
        super().__init__()
        C = config.hidden
        assert C % config.n_head == 0, "hidden size must be divisible by the number of heads"
        self.n_head = config.n_head
        self.query = nn.Linear(C, C)
        self.key = nn.Linear(C, C)
        self.value = nn.Linear(C, C)
        self.attn_out = nn.Linear(C, C)
        self.attn_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.inter = nn.Linear(C, config.intermediate)
        self.out = nn.Linear(config.intermediate, C)
        self.out_norm = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.drop = Dropout(config.dropout)
        self.attn_dropout = config.dropout
        self.pre_norm = config.pre_norm
        self.scale = None  # softmax scale: None = 1/sqrt(hs); sparse.compact_attention keeps it when hs shrinks

    def attention(self, x, attn_mask, real=None):
        """x (B, T, C) -> (B, T, C); or, with `real` (B, T) bool, x (N, C) holds only the N real
        positions: they are projected as they are and laid out as (B, T, C) for attention alone."""
        q, k, v = (lin(x) for lin in (self.query, self.key, self.value))
        if real is not None:
            q, k, v = (unpack(t, real) for t in (q, k, v))
        B, T, _ = q.shape
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        p = self.attn_dropout if self.training else 0.0
        if p > 0 and x.device.type == "cpu":
            y = attend_with_dropout(q, k, v, attn_mask, p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, nh, T, hs) -> (B, T, C)
        return self.attn_out(y if real is None else y[real])

    def feed_forward(self, x):
        return self.out(F.gelu(self.inter(x)))  # exact (erf) GELU, as in BERT

    def forward(self, x, attn_mask, select=None, real=None):
        """(B, T, C) -> (B, T, C); with `select`, only those positions come out: (N, C).
        With `real` (B, T) bool, x and the output are (N, C): the real positions only (`BertModel`).

        `select` is a (B, T) bool mask (N varies from batch to batch), or N flat indices into the
        B x T positions (a fixed N: the static shapes that torch.compile and CUDA graphs need).

        Every position still serves as a key and value, but everything after attention (output
        projection, residuals, LayerNorms, feed-forward) works per position, so it can skip the
        positions nobody reads: in the last layer under MLM, all that are not masked (60-85%).
        """
        if self.pre_norm:  # x + f(LN(x)) (Xiong et al. 2020)
            a = self.attention(self.attn_norm(x), attn_mask, real)
            if select is not None:
                x, a = pick(x, select), pick(a, select)
            x = x + self.drop(a)
            return x + self.drop(self.feed_forward(self.out_norm(x)))
        a = self.attention(x, attn_mask, real)
        if select is not None:
            x, a = pick(x, select), pick(a, select)
        x = self.attn_norm(x + self.drop(a))  # LN(x + f(x)), BERT
        return self.out_norm(x + self.drop(self.feed_forward(x)))


def pick(x, select):
    """The rows of x (B, T, C) at `select`: a (B, T) bool mask, or flat indices into B x T. -> (N, C)"""
    return x[select] if select.dtype == torch.bool else x.flatten(0, 1)[select]


def unpack(x, real):
    """(N, C) rows of the real positions -> (B, T, C), zeros at the padding (`real`: (B, T) bool)."""
    full = x.new_zeros(*real.shape, x.size(-1))
    full[real] = x
    return full


def alibi_slopes(n_head):
    """ALiBi's per-head slopes (Press et al. 2022, section 3): the geometric sequence 2^(-8h/nh), h = 1..nh."""
    return torch.tensor([2.0 ** (-8 * h / n_head) for h in range(1, n_head + 1)])


def alibi_bias(n_head, T, device=None):
    """Attention bias (nh, T, T): head h adds -m_h * |i - j| to the score of query i on key j.

    ALiBi (Press et al. 2022), symmetric for a bidirectional encoder as in MosaicBERT (Portes et
    al. 2023). A steep head attends to its neighbours from the first step; with learned absolute
    positions alone, a small BERT needs thousands of steps to discover that locality (docs/time-to-
    quality.md). The learned position embeddings stay: the bias is added, nothing is removed.
    """
    pos = torch.arange(T, device=device)
    distance = (pos[None, :] - pos[:, None]).abs()  # (T, T)
    return -alibi_slopes(n_head).to(device)[:, None, None] * distance  # (nh, T, T)


class BertModel(nn.Module):
    """Embeddings followed by the stack of encoder layers; returns hidden states (B, T, C)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.emb = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.n_layer))
        # pre-LN needs a final LayerNorm, post-LN ends in one already
        self.final_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps) if config.pre_norm else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, select=None, skip_padding=False):
        """Hidden states (B, T, C); with `select` (B, T) bool, the last layer's at those positions only (N, C).

        `skip_padding`: everything but attention itself works per position, so it can run on the
        real positions alone, packed as (N, C); a batch of sentences of mixed lengths is a third
        to a half padding (tests/bench_finetune.py). The same numbers at the real positions (up
        to float rounding); the padded positions come out as zeros.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # padding comes from the attention mask, never from the token ids
        attn_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): True = may attend
        if self.config.alibi:  # one float mask: the distance bias, and -inf on padded keys
            T = input_ids.size(1)
            padding = torch.zeros(attn_mask.shape, device=input_ids.device).masked_fill(~attn_mask, float("-inf"))
            attn_mask = alibi_bias(self.config.n_head, T, input_ids.device) + padding  # (B, nh, T, T)
        real = attention_mask.bool() if skip_padding else None
        assert real is None or select is None, "select or skip_padding, not both"
        x = self.emb(input_ids, token_type_ids)
        if real is not None:
            x = x[real]  # (N, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, attn_mask, select if i == len(self.layers) - 1 else None, real)
        x = self.final_norm(x) if self.final_norm is not None else x
        return x if real is None else unpack(x, real)


def init_weights(module, std):
    """BERT's initialisation: N(0, 0.02) for Linear and Embedding weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BertForMaskedLM(nn.Module):
    """BERT with the MLM head: Linear + GELU + LayerNorm, then the tied word-embedding decoder."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.transform = nn.Linear(config.hidden, config.hidden)
        self.transform_norm = nn.LayerNorm(config.hidden, eps=config.layer_norm_eps)
        self.decoder_bias = nn.Parameter(torch.zeros(config.vocab_size))  # own bias, tied weight
        init_weights(self, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, predict=None):
        """Logits and loss. `predict` (N,), optional: the flat positions to predict, a fixed number
        per batch (`train.mlm_batch(max_predictions=N)`), padded with positions labelled IGNORE_INDEX."""
        if predict is not None:  # static shape: the same N every batch, so no data-dependent sizes
            x = self.bert(input_ids, attention_mask, token_type_ids, select=predict)  # (N, C)
            labels = labels.flatten()[predict]  # (N,), IGNORE_INDEX at the padding
        elif labels is None:
            x = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        else:
            # only 15-40% of positions carry a label: the last layer and the head, the vocabulary
            # projection above all (most of a small model's cost), run at just those positions
            selected = labels != IGNORE_INDEX
            x = self.bert(input_ids, attention_mask, token_type_ids, select=selected)  # (N, C)
            labels = labels[selected]  # (N,)
        x = self.transform_norm(F.gelu(self.transform(x)))
        logits = F.linear(x, self.bert.emb.word.weight, self.decoder_bias)  # (N, V) or (B, T, V)
        loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX) if labels is not None else None
        return logits, loss


class BertForTokenClassification(nn.Module):
    """BERT with a per-token linear classifier (NER, BERT 4.3)."""

    def __init__(self, config, num_labels):
        super().__init__()
        self.config, self.num_labels = config, num_labels
        self.bert = BertModel(config)
        self.drop = Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden, num_labels)
        self.skip_padding = True  # batches of sentences are padded: BertModel(skip_padding); False
                                  # computes the padding too (the reference in tests and bench_finetune.py)
        init_weights(self, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        x = self.bert(input_ids, attention_mask, token_type_ids, skip_padding=self.skip_padding)
        logits = self.classifier(self.drop(x))  # (B, T, K)
        loss = None
        if labels is not None:  # padding and non-first word pieces carry IGNORE_INDEX
            loss = F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1), ignore_index=IGNORE_INDEX)
        return logits, loss


class BertForSequenceClassification(nn.Module):
    """BERT with a tanh pooler over [CLS] and a linear classifier (BERT 4.1).

    multi_label=True trains one sigmoid per label (labels are a float 0/1 matrix (B, K)).
    """

    def __init__(self, config, num_labels, multi_label=False):
        super().__init__()
        self.config, self.num_labels, self.multi_label = config, num_labels, multi_label
        self.bert = BertModel(config)
        self.pooler = nn.Linear(config.hidden, config.hidden)
        self.drop = Dropout(config.dropout)
        self.classifier = nn.Linear(config.hidden, num_labels)
        self.skip_padding = True  # as in BertForTokenClassification
        init_weights(self, config.initializer_range)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None):
        x = self.bert(input_ids, attention_mask, token_type_ids, skip_padding=self.skip_padding)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, C): the [CLS] position
        logits = self.classifier(self.drop(pooled))  # (B, K)
        loss = None
        if labels is not None:
            loss = (F.binary_cross_entropy_with_logits(logits, labels.float()) if self.multi_label
                    else F.cross_entropy(logits, labels))
        return logits, loss


def count_parameters(model):
    """Number of distinct parameters (the tied decoder weight counted once)."""
    return sum(p.numel() for p in model.parameters())
