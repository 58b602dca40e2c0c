"""Default settings of the methods, in one place so that measurements can retune them.

rho = 0.2 and beta = 0.4 are CoreInfer's values (the predecessor method); the prune layer, budget and match
set are starting points until they are measured on the bundled model.
"""

PRUNE_LAYER = 1  # tokens are chosen from this layer's FFN activations and removed after it
TOKEN_BUDGET = 0.25  # visual tokens kept per image: int count, fraction in (0, 1], or None for the elbow
RHO = 0.2  # token-wise core neurons: share of a token's positive activations
BETA = 0.4  # sentence-wise core neurons: share of the FFN width
# None: no layer decodes with core neurons unless neuron_budgets name some. Measured on the bundled model
# (README, studies/results/): decoding with core neurons at beta 0.4 on every layer after the prune layer cut
# easy-vqa answers to the first token's worth (open answers ran on without <|im_end|>), and on SmolLM2-135M text
# every tested beta < 1 and layer set raised continuation perplexity many times over. The rule study
# (studies/neuron_rules.py: other rules, per-layer budgets from cm.calibrate, a static hot set, refreshing) found
# no prompt-set rule within 10% of dense perplexity at 25% fewer decode FFN FLOPs, the bar for turning it on.
NEURON_LAYERS = None
MATCH = "text"  # the match set: "all" tokens, the "text" tokens, or the "last" token
MIN_TOKENS = 1  # never keep fewer visual tokens per image
NEURON_RULE = "paper"  # how decode neurons are chosen: "paper" (C_beta), "magnitude" or "mass"
NEURON_BUDGETS = None  # per-layer shares of the FFN width kept while decoding (None: beta on every neuron layer)
RANDOM_SEED = 0
MATCH_SETS = ("all", "text", "last")

