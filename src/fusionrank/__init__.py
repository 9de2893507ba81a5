"""fusionrank: train, gate and ship an e-commerce ranker that fuses a fine-tuned BERT with classic signals."""

__version__ = "0.1.0"
