"""Output agreement with the baseline: next-token distributions of a method against ``sdpa``'s, on real prose.

One forward over exactly ``length`` tokens of the haystack corpus (a seeded window, as :mod:`.perplexity` builds
it); over the last ``last_tokens`` predicted positions (default ``min(1024, length // 4)``, where a sparse prefill
has the most context to drop) the runner compares the method's next-token distribution with the baseline's on the
same tokens: mean KL(baseline || method) in nats, top-1 agreement (the fraction of positions whose argmax matches)
and the method's perplexity on those positions (``ppl_window``). The baseline's own case records KL 0 and top-1 1.
No generation and no string matching: the measure works on a random-weight model too, and it is the closest
signal to "the method changes nothing" that a handful of prompts can give.
"""

from __future__ import annotations

from sparseflash.eval.tasks.base import register_task
from sparseflash.eval.tasks.perplexity import Perplexity


@register_task
class Agreement(Perplexity):
    """The perplexity task's window, scored by agreement with the baseline instead of by perplexity."""

    name = "agreement"
    kind = "agreement"
    metric = "agreement"
    description = "next-token KL and top-1 agreement with the sdpa baseline over the last quarter (max 1024)"
