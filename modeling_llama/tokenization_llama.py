"""SentencePiece-backed LLaMA tokenizer: the exact behaviour of Meta's ``tokenizer.model``.

Encoding is ``sentencepiece.SentencePieceProcessor.encode`` on the whole text (dummy-prefix space, digits split
one per token, byte fallback for unseen characters), with BOS prepended by default. Decoding of ordinary ids is
``SentencePieceProcessor.decode``.

Special tokens in user text. ``"<s>"``, ``"</s>"`` and ``"<unk>"`` typed by a user are plain text, exactly as
sentencepiece treats them: ``split_special_tokens`` defaults to ``True`` so no string can inject an end-of-sequence.
Callers that build prompts with literal special tokens opt in per call with ``split_special_tokens=False``.

Padding. LLaMA has no pad token. Batches are padded with ``<unk>`` (id 0), which a byte-fallback tokenizer never
produces from text, so padding never collides with EOS (a pad==eos choice would mask the EOS labels that teach a
finetuned model to stop). The attention mask carries the padding; the model derives positions from it, and
``padding_side`` is ``"left"`` so that ``generate()`` continues every row from its last real token.
"""

from __future__ import annotations

from typing import Any

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

__all__ = ["LlamaTokenizer"]

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
SPIECE_UNDERLINE = "▁"


class LlamaTokenizer(SentencePieceBackend):
    """LLaMA tokenizer on the ``sentencepiece`` library (the reference behaviour).

    Args:
        vocab_file: path to the SentencePiece ``tokenizer.model``.
        unk_token, bos_token, eos_token: Meta's ``<unk>`` (0), ``<s>`` (1), ``</s>`` (2).
        pad_token: token used to pad batches (``<unk>`` by default, see the module docstring); ``None`` disables it.
        add_bos_token: prepend BOS when ``add_special_tokens=True`` (default, as in pretraining).
        add_eos_token: append EOS (useful to build finetuning targets).
        split_special_tokens: treat literal special-token strings in text as text (default ``True``).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str | None = None,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str | None = "<unk>",
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        split_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        if vocab_file is None:
            raise ValueError("LlamaTokenizer needs vocab_file=<path to tokenizer.model>.")
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.pop("legacy", None)  # the dummy-prefix behaviour of the original model is the only one
        kwargs.setdefault("padding_side", "left")
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            split_special_tokens=split_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            legacy=True,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------------ encode
    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self.add_eos_token and self.eos_token_id is not None else []
        out = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            out = out + bos + token_ids_1 + eos
        return out

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids)
            return [1 if i in special else 0 for i in token_ids_0]
        bos = [1] if self.add_bos_token and self.bos_token_id is not None else []
        eos = [1] if self.add_eos_token and self.eos_token_id is not None else []
        out = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            out = out + bos + [0] * len(token_ids_1) + eos
        return out

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # ------------------------------------------------------------------------------------------------ decode
    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces -> text with sentencepiece itself; special/added tokens are copied verbatim."""
        verbatim = self._added_tokens_encoder  # <unk>, <s>, </s> and any added token
        out: list[str] = []
        run: list[str] = []

        def flush() -> None:
            if run:
                text = self.sp_model.decode_pieces(run)
                # sentencepiece drops the leading "▁" of a decode as the dummy prefix; it is only a dummy
                # prefix at the very start of the output, elsewhere it is a real space.
                if out and run[0].startswith(SPIECE_UNDERLINE):
                    text = " " + text
                out.append(text)
                run.clear()

        for token in tokens:
            if token in verbatim:
                flush()
                out.append(token)
            else:
                run.append(token)
        flush()
        return "".join(out)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if skip_special_tokens:
            drop = set(self.all_special_ids)
            token_ids = [i for i in token_ids if i not in drop]
        tokens = [self._convert_id_to_token_with_added(i) for i in token_ids]
        text = self.convert_tokens_to_string(tokens)
        clean = (
            clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is not None
            else self.clean_up_tokenization_spaces
        )
        return self.clean_up_tokenization(text) if clean else text

    def _convert_id_to_token_with_added(self, index: int) -> str:
        if index in self._added_tokens_decoder:
            return self._added_tokens_decoder[index].content
        if not 0 <= index < self.sp_model.get_piece_size():
            raise IndexError(f"Token id {index} is outside the vocabulary of size {len(self)}.")
        return self.sp_model.id_to_piece(index)
