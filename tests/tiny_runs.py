"""The run the distributed tests share as their base, named once.

The demo experiment's recipe and data settings with the plain `vit_demo` ViT at 14 px (2 x 2
tokens): steps take milliseconds, and timm rebuilds the model for the parity checks. The demo itself
trains a hybrid (configs/model/hybrid_demo.yaml), which these tests have no reason to pay for.
"""
TINY_VIT = ["model=vit_demo", "model.img_size=14"]
TINY_VIT_RUN = ["+experiment=demo_pretrain", *TINY_VIT]
