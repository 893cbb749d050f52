"""Built-in tasks with hidden gold oracles and simulated labelers (no downloads).

`instructions`: a small instruction-following task (sort, reverse, count, uppercase, remove
vowels, repeat, first n, largest) with a gold judge, imperfect demonstrations and a corpus;
`labelers`: Plackett-Luce / Bradley-Terry simulated rankings; `tokenizer`: its word-level HF
tokenizer and chat template; `export`: JSONL/text files for the data package; `builtin`: the files standalone SFT/RM runs use.
"""
from rlhf_jax.tasks.builtin import builtin_rankings, builtin_task
from rlhf_jax.tasks.export import (export_task, load_gold, write_corpus, write_demonstrations,
                                   write_gold, write_prompts, write_rankings)
from rlhf_jax.tasks.instructions import (KINDS, PREAMBLES, SUFFIXES, Example, answer_distance,
                                         corpus, demonstration, gold_score, gold_scores,
                                         sample_examples, split_of, task_words, win_rate)
from rlhf_jax.tasks.labelers import (bayes_pair_accuracy, collect_rankings, labeler_agreement,
                                     preference_probability, rank_responses, ranks_from_ranking)
from rlhf_jax.tasks.tokenizer import (CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer,
                                      format_dialogue, format_prompt, save_tokenizer)
