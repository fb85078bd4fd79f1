"""Example reward functions for `env.reward_fn`, usable on any env (docs/DATA.md, "Your own reward"):

    python -m marl_llm.train ... 'env.reward_fn=[env,examples.rewards:brevity]' 'env.reward_weights=[1.0,0.2]'

A reward function gets the env's task dict and the agents' replies (agent name -> text) and returns
a number, or a dict of named components whose sum is its reward.
"""


def brevity(task, outputs):
    """1.0 for an empty reply, falling linearly to 0.0 at 100 words (mean over the agents' replies)."""
    words = [len(text.split()) for text in outputs.values()]
    return sum(max(0.0, 1.0 - n / 100) for n in words) / max(1, len(words))


brevity.max_reward = 1.0  # declared, so the run knows the best reward (early stopping, envcheck)


def tidy(task, outputs):
    """Two components: `distinct`, the share of distinct words, and `ends_sentence`, 1.0 when every
    reply ends with . ! ? or a closing tag (such as </answer>)."""
    texts = list(outputs.values())
    words = " ".join(texts).split()
    return {"distinct": len(set(words)) / len(words) if words else 0.0,
            "ends_sentence": float(all(t.rstrip().endswith((".", "!", "?", ">")) for t in texts))}


tidy.max_reward = 2.0
