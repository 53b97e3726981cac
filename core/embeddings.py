"""Textual inversion (network.algorithm "textual_inversion"): a new word for the tokenizers, whose embedding
vectors are the only thing that trains, as sd-scripts' train_textual_inversion.py does.

The token ``sks`` with N vectors becomes the placeholder tokens ``sks sks1 … sks<N-1>`` (sd-scripts' names); every
caption and preview prompt has the token replaced by them before it is tokenized.  Each text encoder gets N new
rows: its token embedding is wrapped (:class:`PlaceholderEmbedding`) so that the base matrix is read as it is and
the new ids read a small fp32 parameter.  Nothing else is a parameter of the run, so the base rows stay
bit-identical whatever the optimizer does (weight decay included) and no copy of the whole matrix is kept.

:class:`TextualInversion` offers the trainer the adapter networks' surface (parameters, param_groups, train/eval,
restore, export and training state); the family names the file's keys (``Architecture.embedding_keys``:
``emb_params`` for SD1.5, ``clip_l`` / ``clip_g`` for SDXL), which A1111, ComfyUI and diffusers load.
"""
from __future__ import annotations

import torch
from torch import nn

from core.settings import SettingsError

TEXTUAL_INVERSION = "textual_inversion"


def trains_new_token(network, arch) -> bool:
    """Whether a run trains a new token's embedding: textual inversion, or pivotal tuning beside an adapter.
    ``network.pivotal`` applies only to an adapter of a family that trains embeddings (elsewhere the UI hides it
    and the run ignores it, as ``Settings.applies`` says)."""
    from core.settings import ADAPTER_ALGORITHMS
    return network.algorithm == TEXTUAL_INVERSION or (
        network.pivotal and network.algorithm in ADAPTER_ALGORITHMS and bool(arch.embedding_keys))


def placeholder_tokens(token: str, num_vectors: int) -> list[str]:
    """The token and its extra vectors' names: ``sks``, ``sks1`` … ``sks<N-1>`` (sd-scripts' naming)."""
    return [token] + [f"{token}{i}" for i in range(1, num_vectors)]


def settings_problems(network) -> list[str]:
    """What is wrong with the textual-inversion settings themselves (the family checks its vocabulary)."""
    out = []
    token = network.ti_token
    if not token.strip():
        out.append("network.ti_token: choose the new word to train (a made-up word such as 'sks' or 'ohwx')")
    elif any(c.isspace() for c in token):
        out.append(f"network.ti_token: {token!r} must be one word without spaces")
    if not network.ti_init_word.strip():
        out.append("network.ti_init_word: choose a word close to what the images show (e.g. 'dog' or "
                   "'painting'); its embedding starts the new vectors")
    return out


def known_token_problems(network, known) -> list[str]:
    """The placeholder tokens that ``known(text)`` (the family's tokenizers) already has: training one would
    change what an existing word means."""
    if not network.ti_token.strip() or any(c.isspace() for c in network.ti_token):
        return []  # said by settings_problems
    out = []
    for i, text in enumerate(placeholder_tokens(network.ti_token, network.ti_num_vectors)):
        if known(text):
            which = "" if i == 0 else f" (the name of vector {i + 1} of network.ti_num_vectors)"
            out.append(f"network.ti_token: the tokenizer already knows {text!r}{which}; choose a made-up word "
                       f"it does not know, such as 'sks' or 'ohwx'")
    return out


def check_token_in_captions(token: str, captions: list[str]) -> None:
    """A token that no training caption contains would never receive a gradient: refused before loading."""
    if not any(token in caption for caption in captions):
        raise SettingsError(f"network.ti_token: no training caption contains {token!r}, so its embedding would "
                            f"not train. Write it into the captions (e.g. 'a photo of {token}'), or set "
                            f"dataset.default_caption for images without a caption file.")


class PlaceholderEmbedding(nn.Module):
    """A text encoder's token embedding with rows appended: ids of the base vocabulary read the frozen matrix,
    the ids after it read ``vectors`` (trained, fp32, cast to the matrix's dtype)."""

    def __init__(self, base: nn.Embedding, vectors: nn.Parameter):
        super().__init__()
        self.base = base
        # kept out of the module's parameters: the text encoder keeps its dtype (diffusers reads it from the first
        # parameter) and its state dict
        self.trained = [vectors]

    @property
    def weight(self) -> torch.Tensor:
        """The whole matrix as a loader holds it (what ``restore`` writes into the encoder; the forward reads the
        two parts instead, so the gradient reaches only the new rows)."""
        return torch.cat([self.base.weight, self.trained[0].to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.base.num_embeddings
        out = self.base(ids.clamp(max=n - 1))
        added = self.trained[0].to(out.dtype)[(ids - n).clamp(min=0)]
        return torch.where((ids >= n).unsqueeze(-1), added, out)


class TextualInversion:
    """The placeholder tokens added to every tokenizer and text encoder of ``components``, their vectors (one
    ``(N, width)`` parameter per encoder, each row started at the init word's mean embedding) as the trainable."""

    #: the denoiser stays frozen (block swapping keeps its weights read-only)
    trains_denoiser = False

    def __init__(self, components, keys: tuple[str, ...], network):
        self.token = network.ti_token
        self.tokens = placeholder_tokens(self.token, network.ti_num_vectors)
        self.init_word = network.ti_init_word
        self.keys = keys
        self.encoders = list(components.text_encoders)
        self.vectors: list[nn.Parameter] = []
        self.init_tokens: list[int] = []
        for tokenizer, te in zip(components.tokenizers, self.encoders, strict=True):
            base = te.get_input_embeddings()
            vocabulary = tokenizer.get_vocab()
            taken = [t for t in self.tokens if t in vocabulary]
            if taken:
                raise SettingsError(f"network.ti_token: this model's tokenizer already knows {taken[0]!r}; choose "
                                    f"a made-up word it does not know")
            init_ids = tokenizer.encode(self.init_word, add_special_tokens=False)
            if not init_ids:
                raise SettingsError(f"network.ti_init_word: {self.init_word!r} gives no token")
            tokenizer.add_tokens(self.tokens)
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            first = base.num_embeddings
            if ids != list(range(first, first + len(self.tokens))):
                raise ValueError(f"{type(tokenizer).__name__} gave the new tokens the ids {ids}, not the rows "
                                 f"{first}… after {type(te).__name__}'s embedding matrix: the tokenizer holds tokens "
                                 f"the text encoder has no embedding for")
            with torch.no_grad():
                init = base.weight[init_ids].float().mean(dim=0)
            vectors = nn.Parameter(init.repeat(len(self.tokens), 1))
            te.set_input_embeddings(PlaceholderEmbedding(base, vectors))
            self.vectors.append(vectors)
            self.init_tokens.append(len(init_ids))

    def summary(self) -> str:
        return (f"Textual inversion: {self.token!r} as {len(self.tokens)} token(s) ({' '.join(self.tokens)}) in "
                f"{len(self.vectors)} text encoder(s), started from {self.init_word!r} "
                f"({self.init_tokens[0]} token(s) averaged); {sum(v.numel() for v in self.vectors)} trainable "
                f"parameters")

    def placeholders(self, text: str) -> str:
        """``text`` with the token replaced by its placeholder tokens (as sd-scripts replaces it in captions)."""
        return text.replace(self.token, " ".join(self.tokens)) if len(self.tokens) > 1 else text

    # -- what the optimizer and the loop need ----------------------------------------------------------
    def named_parameters(self):
        return zip(self.keys, self.vectors)

    def parameters(self):
        return iter(self.vectors)

    def param_groups(self, lr: float, text_encoder_lr: float) -> list[dict]:
        return [{"params": list(self.vectors), "lr": lr, "name": "embedding"}]

    def train(self, mode: bool = True):
        """Nothing to switch: the text encoders are frozen and the vectors have no dropout."""
        return self

    def eval(self):
        return self

    @torch.no_grad()
    def restore(self) -> None:
        """The trained rows become part of each encoder's embedding matrix, as a loader puts them there: the
        tokenizers keep the new tokens, and the text encoders go on encoding them after the run."""
        for te in self.encoders:
            weight = te.get_input_embeddings().weight
            te.set_input_embeddings(nn.Embedding.from_pretrained(weight, freeze=True))
            te.config.vocab_size = weight.shape[0]

    # -- files -----------------------------------------------------------------------------------------
    def export_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The embedding file: one ``(N, width)`` tensor per text encoder under the family's key."""
        return {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.named_parameters()}

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        return self.export_state_dict(torch.float32)

    @torch.no_grad()
    def load_export_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for key, vectors in self.named_parameters():
            if key not in sd or sd[key].shape != vectors.shape:
                got = tuple(sd[key].shape) if key in sd else "nothing"
                raise ValueError(f"the saved embedding does not fit this run: {key} should be {tuple(vectors.shape)}, "
                                 f"the file holds {got}")
            vectors.copy_(sd[key])


#: the suffix of a pivotal run's embedding file beside its adapter: ``<name>_emb.safetensors``
EMBEDDING_FILE_SUFFIX = "_emb"


class PivotalTuning:
    """Pivotal tuning: an adapter network and a new token's embedding (:class:`TextualInversion`) trained
    together, offering the trainer the same surface as each of them.  The embedding has its own learning rate
    (its vectors want far larger steps than an adapter's weights)."""

    def __init__(self, adapters, embedding: TextualInversion, embedding_lr: float):
        self.adapters = adapters
        self.embedding = embedding
        self.embedding_lr = embedding_lr

    def named_parameters(self):
        yield from self.adapters.named_parameters()
        for key, vectors in self.embedding.named_parameters():
            yield f"embedding.{key}", vectors

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def param_groups(self, lr: float, text_encoder_lr: float) -> list[dict]:
        groups = self.adapters.param_groups(lr, text_encoder_lr)
        return groups + self.embedding.param_groups(self.embedding_lr or lr, text_encoder_lr)

    def train(self, mode: bool = True):
        self.adapters.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def restore(self) -> None:
        self.adapters.restore()
        self.embedding.restore()

    # -- files -----------------------------------------------------------------------------------------
    def export_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The adapter's tensors (the family maps them to its file layout); the embedding is added by
        :meth:`with_embedding`."""
        return self.adapters.export_state_dict(dtype)

    def with_embedding(self, files: dict[str, dict], bundle_names: tuple[str, ...],
                       dtype: torch.dtype | None) -> dict[str, dict]:
        """The adapter's files with the embedding added: inside the adapter file as
        ``bundle_emb.<token>.<name>`` (what A1111 / Forge load with a LoRA, and ComfyUI from an embedding
        file), and alone as the ``_emb`` file."""
        vectors = self.embedding.export_state_dict(dtype)
        bundle = {f"bundle_emb.{self.embedding.token}.{name}": vectors[key]
                  for key, name in zip(self.embedding.keys, bundle_names, strict=True)}
        return {**files, "": {**files[""], **bundle}, EMBEDDING_FILE_SUFFIX: vectors}

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.adapters.training_state_dict(),
                **{f"embedding.{k}": v for k, v in self.embedding.training_state_dict().items()}}

    def load_export_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.embedding.load_export_state_dict({k.removeprefix("embedding."): v for k, v in sd.items()
                                               if k.startswith("embedding.")})
        self.adapters.load_export_state_dict({k: v for k, v in sd.items() if not k.startswith("embedding.")})


def embedding_metadata(adapter_md: dict[str, str], arch, settings) -> dict[str, str]:
    """An embedding file's metadata: the run's ``ss_*`` / ``modelspec.*`` entries without those that describe an
    adapter network, the family's textual-inversion architecture (sd-scripts' ``…/textual-inversion``), and the
    token as the trigger phrase unless one is set."""
    from core.export import without_network_entries
    md = without_network_entries(adapter_md)
    md["modelspec.architecture"] = arch.modelspec_embedding_architecture
    md.setdefault("modelspec.trigger_phrase", settings.network.ti_token)
    return md
