import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from glimpse.data.tokenizer import Tokenizer, train_tokenizer
from glimpse.errors import GlimpseError


def test_trained_tokenizer_round_trips_and_has_special_tokens(tmp_path):
    texts = ["a large red circle on the left", "a small blue square at the top"] * 20
    tok = train_tokenizer(texts, tmp_path / "tokenizer.json", vocab_size=300)
    again = Tokenizer(tmp_path)  # a folder holding tokenizer.json works too
    assert again.encode("a small red square") == tok.encode("A Small RED square")  # lowercased
    assert tok.decode(tok.encode("a small red square")).strip() == "a small red square"
    assert all(tok.ids[r] is not None for r in ("pad", "bos", "eos", "image"))
    ids, mask = tok.batch(["a red circle", "a small blue square at the top"], max_length=6)
    assert ids.shape == mask.shape == (2, 6)
    assert ids[0, 0] == tok.ids["bos"] and ids[1, -1] == tok.ids["eos"]  # truncation keeps the eos
    assert mask[0].tolist().count(0) > 0 and ids[0, -1] == tok.pad_id
    # unseen text still encodes (byte-level), with no unknown token
    assert tok.decode(tok.encode("crimson rhombus é")).strip() == "crimson rhombus é"


def test_loads_a_foreign_tokenizer_json(tmp_path):
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "red": 4, "circle": 5}
    hf = HFTokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path / "tokenizer.json")
    assert (tok.pad_id, tok.ids["bos"], tok.ids["eos"]) == (0, 2, 3)  # BERT's names for the roles
    assert tok.encode("red circle", add_bos=True, add_eos=True) == [2, 4, 5, 3]


def test_missing_or_broken_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(GlimpseError, match="no tokenizer"):
        Tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GlimpseError, match="cannot read tokenizer .*bad.json"):
        Tokenizer(tmp_path / "bad.json")
