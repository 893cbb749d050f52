"""Reward functions of the verifiable-reward tests, in a module of their own so that the scripts a
test starts can import them (`tests.reward_functions:words_equal_to_answer`) without pytest."""


def words_equal_to_answer(prompts, responses, *, answer):
    """Test reward: how many words of the response equal the gold answer, plus 0.1 per word."""
    return [sum(w == a for w in r.split()) + 0.1 * len(r.split()) for r, a in zip(responses, answer)]


def raises_on_seven(prompts, responses, **fields):
    if any("7" in r for r in responses):
        raise KeyError("seven")
    return [0.0] * len(responses)


def always_raises(prompts, responses, **fields):
    raise RuntimeError("reward server down")


def needs_gold(prompts, responses, *, gold, scale=1.0):
    """Names a field (`gold`) the arithmetic prompt files do not have; `scale` has a default, so it is optional."""
    return [scale * float(r.strip() == g) for r, g in zip(responses, gold)]


def reads_gold_from_fields(prompts, responses, **fields):
    """Reads `gold` out of **fields: what it needs cannot be known before it runs."""
    return [float(r.strip() == g) for r, g in zip(responses, fields["gold"])]
