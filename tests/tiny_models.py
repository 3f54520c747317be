"""Tiny random-weight models built in seconds, in real formats the real engines load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the a and of to in is it you that he was for on are with as his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new "
    "work part take get place made live where after back little only round man year came show"
).split()


def _spm_vocabulary(
    controls: tuple[str, ...] = (),
) -> tuple[list[str], list[int], list[float], int]:
    """A small SentencePiece-style vocabulary: specials, the 256 byte tokens, letters and words.
    Returns the tokens, their types, their scores and the index of the first word piece."""
    from gguf import TokenType

    tokens: list[str] = ["<unk>", "<s>", "</s>", *controls]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    types += [TokenType.CONTROL] * len(controls)
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(TokenType.BYTE)
    first_word = len(tokens)
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += [f"\u2581{w}" for w in dict.fromkeys(_WORDS)]
    for piece in pieces:
        tokens.append(piece)
        types.append(TokenType.NORMAL)
    scores = [0.0] * first_word + [float(len(p)) for p in pieces]
    return tokens, [int(t) for t in types], scores, first_word


def _add_vocabulary(writer: Any, tokens: list[str], types: list[int], scores: list[float]) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def _add_word_head(writer: Any, weight: Any, vocab: int, embed: int, first_word: int) -> None:
    """Embeddings and an output layer that never prefers </s>, bytes or control tokens over
    words, so that greedy generation produces words until max_tokens."""
    output = weight(vocab, embed, scale=1.0)
    output[:first_word] = 0.0
    output[first_word:] += 0.5 * np.abs(output[first_word:]).mean()
    writer.add_tensor("token_embd.weight", weight(vocab, embed, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(embed, dtype=np.float32))
    writer.add_tensor("output.weight", output)


def _finish(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_mamba_gguf(path: Path, *, seed: int = 0) -> Path:
    """A Mamba GGUF (a recurrent model: its state cannot be cut back to a prefix), 64-wide,
    2 blocks, the same vocabulary as the tiny llama, no chat template."""
    from gguf import GGUFWriter

    tokens, types, scores, first_word = _spm_vocabulary()
    vocab = len(tokens)
    embed, blocks, inner, state, kernel, rank = 64, 2, 128, 8, 4, 4
    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = GGUFWriter(str(path), "mamba")
    writer.add_context_length(512)
    writer.add_embedding_length(embed)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_head_count_kv(0)
    writer.add_ssm_conv_kernel(kernel)
    writer.add_ssm_inner_size(inner)
    writer.add_ssm_state_size(state)
    writer.add_ssm_time_step_rank(rank)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    _add_vocabulary(writer, tokens, types, scores)
    _add_word_head(writer, weight, vocab, embed, first_word)
    for block in range(blocks):
        prefix = f"blk.{block}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(embed, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ssm_in.weight", weight(2 * inner, embed))
        writer.add_tensor(f"{prefix}.ssm_conv1d.weight", weight(inner, kernel))
        writer.add_tensor(f"{prefix}.ssm_conv1d.bias", weight(inner))
        writer.add_tensor(f"{prefix}.ssm_x.weight", weight(rank + 2 * state, inner))
        writer.add_tensor(f"{prefix}.ssm_dt.weight", weight(inner, rank))
        writer.add_tensor(f"{prefix}.ssm_dt.bias", weight(inner))
        writer.add_tensor(f"{prefix}.ssm_a", -np.abs(weight(inner, state, scale=1.0)) - 0.1)
        writer.add_tensor(f"{prefix}.ssm_d", np.ones(inner, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ssm_out.weight", weight(embed, inner))
    _finish(writer)
    return path


#: The fill-in-the-middle control tokens `infill=True` adds (ids 6, 7, 8).
INFILL_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


def write_tiny_llama_gguf(path: Path, *, seed: int = 0, infill: bool = False) -> Path:
    """A llama-architecture GGUF: 64-wide, 2 blocks, SPM vocabulary, a chat template; with
    `infill`, fill-in-the-middle tokens as code models have.

    Its output never favours end-of-sequence, byte or control tokens, so greedy generation
    produces words until max_tokens.
    """
    from gguf import GGUFWriter

    controls = ("<|system|>", "<|user|>", "<|assistant|>")
    tokens, types, scores, first_word = _spm_vocabulary(
        controls + (INFILL_TOKENS if infill else ())
    )
    vocab = len(tokens)

    embed, blocks, heads, kv_heads, ff = 64, 2, 4, 2, 128
    head_dim = embed // heads
    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(512)
    writer.add_embedding_length(embed)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)  # all F32
    _add_vocabulary(writer, tokens, types, scores)
    writer.add_add_bos_token(True)
    writer.add_chat_template(TINY_CHAT_TEMPLATE)
    if infill:
        for key, token in zip(("pre", "suf", "mid"), INFILL_TOKENS, strict=True):
            writer.add_uint32(f"tokenizer.ggml.fim_{key}_token_id", tokens.index(token))

    _add_word_head(writer, weight, vocab, embed, first_word)
    for block in range(blocks):
        prefix = f"blk.{block}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(embed, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_q.weight", weight(embed, embed))
        writer.add_tensor(f"{prefix}.attn_k.weight", weight(kv_heads * head_dim, embed))
        writer.add_tensor(f"{prefix}.attn_v.weight", weight(kv_heads * head_dim, embed))
        writer.add_tensor(f"{prefix}.attn_output.weight", weight(embed, embed))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(embed, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weight(ff, embed))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(ff, embed))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(embed, ff))
    _finish(writer)
    return path


#: The tiny reranker's positions: a pair longer than this is cut to fit.
TINY_RERANKER_POSITIONS = 128


def write_tiny_reranker_gguf(path: Path, *, seed: int = 0) -> Path:
    """A BERT cross-encoder GGUF as llama.cpp's converter writes one: 32-wide, 2 blocks, a
    WordPiece (`bert`) vocabulary of [PAD] [UNK] [CLS] [SEP] [MASK], letters and words, and a
    one-label classification head (`cls`, `cls.output`). No pooling type in its metadata, as a
    converted bge-reranker has none: llama.cpp reranks with pooling RANK asked for at load."""
    from gguf import GGUFWriter, TokenType

    controls = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # The converter's "phantom space": a word-initial piece starts with U+2581, a
    # continuation ("##s") has none.
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [f"\u2581{w}" for w in dict.fromkeys(_WORDS)] + [f"\u2581{c}" for c in letters]
    pieces += [*letters, "\u2581.", "\u2581,", "\u2581?"]
    tokens = controls + list(dict.fromkeys(pieces))  # "a" is a word and a letter
    types = [int(TokenType.CONTROL)] * len(controls)
    types += [int(TokenType.NORMAL)] * (len(tokens) - len(controls))
    vocab, embed, blocks, heads, ff = len(tokens), 32, 2, 4, 64
    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(prefix: str) -> None:
        writer.add_tensor(f"{prefix}.weight", np.ones(embed, dtype=np.float32))
        writer.add_tensor(f"{prefix}.bias", np.zeros(embed, dtype=np.float32))

    writer = GGUFWriter(str(path), "bert")
    writer.add_name("tiny-random-reranker")
    writer.add_context_length(TINY_RERANKER_POSITIONS)
    writer.add_embedding_length(embed)
    writer.add_block_count(blocks)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_layer_norm_eps(1e-12)
    writer.add_causal_attention(False)
    writer.add_classifier_output_labels(["LABEL_0"])
    writer.add_file_type(0)
    writer.add_tokenizer_model("bert")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_type_count(2)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(1)
    writer.add_bos_token_id(2)  # [CLS]
    writer.add_sep_token_id(3)
    writer.add_mask_token_id(4)

    writer.add_tensor("token_embd.weight", weight(vocab, embed, scale=1.0))
    writer.add_tensor("token_types.weight", weight(2, embed))
    writer.add_tensor("position_embd.weight", weight(TINY_RERANKER_POSITIONS, embed))
    norm("token_embd_norm")
    for block in range(blocks):
        prefix = f"blk.{block}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}.{name}.weight", weight(embed, embed))
            writer.add_tensor(f"{prefix}.{name}.bias", weight(embed))
        norm(f"{prefix}.attn_output_norm")
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(ff, embed))
        writer.add_tensor(f"{prefix}.ffn_up.bias", weight(ff))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(embed, ff))
        writer.add_tensor(f"{prefix}.ffn_down.bias", weight(embed))
        norm(f"{prefix}.layer_output_norm")
    # The head: dense + tanh on [CLS], then one logit (numpy shapes are (out, in)).
    writer.add_tensor("cls.weight", weight(embed, embed, scale=0.5))
    writer.add_tensor("cls.bias", weight(embed))
    writer.add_tensor("cls.output.weight", weight(1, embed, scale=1.0))
    writer.add_tensor("cls.output.bias", np.zeros(1, dtype=np.float32))
    _finish(writer)
    return path


def write_tiny_transformers_llama(directory: Path, *, seed: int = 0) -> Path:
    """A Hugging Face Llama directory (safetensors): 64-wide, 2 layers, a byte-level BPE
    tokenizer trained here, and a chat template. End-of-sequence is never the likeliest token.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 3)] * 4
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Never prefer </s>, a control token or a lone byte: greedy output is whole words.
        model.lm_head.weight[: len(specials) + 256] = 0.0
    model.save_pretrained(directory)
    return directory


def write_tiny_cross_encoder(directory: Path, *, seed: int = 0) -> Path:
    """A Hugging Face BERT cross-encoder directory (BertForSequenceClassification, one label,
    safetensors): 32-wide, 2 layers, 128 positions, a WordPiece tokenizer trained here. Its
    scores are random but fixed by `seed`.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import torch
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=specials, show_progress=False
    )
    corpus = [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 3)] * 4
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    # [CLS] query [SEP] document [SEP], with token types 0 then 1: BERT's pair layout.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = BertTokenizer(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=fast.pad_token_id,
    )
    config.num_labels = 1  # one relevance logit
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def write_tiny_whisper(directory: Path, tokenizer_json: Path) -> Path:
    """A CTranslate2 Whisper model with random weights (d_model 64, 2+2 layers), converted the
    way real ones are, with the real multilingual tokenizer. Its words are garbage.
    """
    import json
    import tempfile

    import ctranslate2
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "hf"
        tokenizer = WhisperTokenizerFast(tokenizer_file=str(tokenizer_json))
        tokenizer.save_pretrained(source)
        torch.manual_seed(0)
        config = WhisperConfig(
            vocab_size=len(tokenizer),
            d_model=64,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            num_mel_bins=80,
            decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        )
        WhisperForConditionalGeneration(config).save_pretrained(source)
        converter = ctranslate2.converters.TransformersConverter(
            str(source), copy_files=["tokenizer.json"]
        )
        converter.convert(str(directory), quantization="int8", force=True)
    # Conversion under transformers 5 leaves lang_ids empty, and language detection then fails:
    # they are the ids after <|startoftranscript|> up to <|translate|>.
    settings = json.loads((directory / "config.json").read_text())
    start = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    translate = tokenizer.convert_tokens_to_ids("<|translate|>")
    if not settings.get("lang_ids"):
        settings["lang_ids"] = list(range(start + 1, translate))
        (directory / "config.json").write_text(json.dumps(settings))
    return directory


def write_tiny_stable_diffusion(directory: Path, *, seed: int = 0) -> Path:
    """A StableDiffusionPipeline of random parts (UNet 32/64, VAE 32/64, 2-layer CLIP, DDIM) that
    makes a 64x64 image by default, in about 0.1 s for 2 steps.
    """
    import json

    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    diffusers_logging.disable_progress_bar()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=600,
            max_position_embeddings=77,
        )
    )
    # A byte-level vocabulary with no merges: every character is its own token.
    characters = _byte_characters()
    vocabulary = [
        "<|startoftext|>",
        "<|endoftext|>",
        *characters,
        *(c + "</w>" for c in characters),
    ]
    tokenizer_dir = directory.parent / f"{directory.name}-tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocabulary)}))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def _byte_characters() -> list[str]:
    """The 256 characters byte-level BPE tokenizers (GPT-2, CLIP) write bytes as."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    codes = list(kept)
    extra = 0
    for byte in range(256):
        if byte not in kept:
            kept.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_tiny_lora_gguf(
    path: Path,
    *,
    seed: int = 1,
    rank: int = 4,
    strength: float = 1.0,
    blocks: int = 2,
    width: int = 64,
) -> Path:
    """A GGUF LoRA adapter for write_tiny_llama_gguf's model: random low-rank updates of every
    block's attention output and feed-forward down projection, strong enough (`strength`) to
    change what the model generates (`width`: the model's, 64; another makes it a LoRA for
    another model)."""
    from gguf import GGUFWriter

    embed, ff = width, 2 * width
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))  # alpha / rank = 1: scale as given
    for block in range(blocks):
        for name, inputs, outputs in (("attn_output", embed, embed), ("ffn_down", ff, embed)):
            tensor = f"blk.{block}.{name}.weight"
            # llama.cpp's layout: lora_a is (rank, in) and lora_b (out, rank) as numpy shapes.
            down = rng.standard_normal((rank, inputs)) * strength / np.sqrt(inputs)
            up = rng.standard_normal((outputs, rank)) * strength
            writer.add_tensor(f"{tensor}.lora_a", down.astype(np.float32))
            writer.add_tensor(f"{tensor}.lora_b", up.astype(np.float32))
    _finish(writer)
    return path
