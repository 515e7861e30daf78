"""Loss + miner presets: the configurations metric-learning users ask for, as ``train`` params.

Each is what goes under ``train:`` in params.yaml (README "Presets" lists them); tests train every
one for a few epochs on separable data and check that the loss falls and Recall@1 rises.
``num_classes`` / ``embedding_size`` of proxy losses are filled in from the data and
``train.embedding_dim`` when left out.
"""

PRESETS: dict[str, dict] = {
    # every valid triplet in the batch (Hermans et al. 2017, "batch all")
    "batch-all": {"loss": {"name": "TripletMarginLoss", "margin": 0.2}, "miner": None},
    # hardest positive and hardest negative per anchor ("batch hard")
    "batch-hard": {"loss": {"name": "TripletMarginLoss", "margin": 0.2}, "miner": {"name": "BatchHardMiner"}},
    # negatives farther than the positive but inside the margin (FaceNet)
    "semi-hard": {
        "loss": {"name": "TripletMarginLoss", "margin": 0.2},
        "miner": {"name": "TripletMarginMiner", "margin": 0.2, "type_of_triplets": "semihard"},
    },
    # easiest positive, hardest negative (Xuan et al. 2020)
    "easy-positive-hard-negative": {
        "loss": {"name": "TripletMarginLoss", "margin": 0.2},
        "miner": {"name": "BatchEasyHardMiner", "pos_strategy": "easy", "neg_strategy": "hard"},
    },
    "multi-similarity": {"loss": {"name": "MultiSimilarityLoss"}, "miner": {"name": "MultiSimilarityMiner"}},
    "contrastive": {"loss": {"name": "ContrastiveLoss", "pos_margin": 0.0, "neg_margin": 1.0}, "miner": None},
    # supervised NT-Xent / InfoNCE: every same-label pair is a positive
    "nt-xent": {"loss": {"name": "NTXentLoss", "temperature": 0.1}, "miner": None},
    # proxy-based: the loss has weights, trained (and checkpointed) with the network
    "arcface": {"loss": {"name": "ArcFaceLoss", "margin": 28.6, "scale": 64}, "miner": None},
    "proxy-anchor": {"loss": {"name": "ProxyAnchorLoss", "margin": 0.1, "alpha": 32}, "miner": None},
    # hard negatives from the last `cross_batch_memory` embeddings, not only this batch (Wang et al. 2020)
    "cross-batch-memory": {
        "loss": {"name": "ContrastiveLoss", "pos_margin": 0.0, "neg_margin": 0.5},
        "miner": {"name": "MultiSimilarityMiner", "epsilon": 0.1},
        "cross_batch_memory": 256,
    },
}
