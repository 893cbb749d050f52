"""Reward functions of the verifiable-reward tests, in a module of their own so that the scripts a
test starts can import them (`tests.reward_functions:words_equal_to_answer`) without pytest."""


def words_equal_to_answer(prompts, responses, *, answer):
    """Test reward: how many words of the response equal the gold answer, plus 0.1 per word."""
    return [sum(w == a for w in r.split()) + 0.1 * len(r.split()) for r, a in zip(responses, answer)]


def raises_on_seven(prompts, responses, **fields):
    if any("7" in r for r in responses):
        raise KeyError("seven")
    return [0.0] * len(responses)
