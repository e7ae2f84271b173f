"""The models: backbones and the feature extractor, COMIC's three-model network and its layers (Eq. 7-10), and the
baselines' networks (linear, ML-GCN, LWS)."""

from comic.models.backbone import BackboneWeightsError, FeatureLayer, Trunks, build_trunk
from comic.models.baseline import BaselineNet, BaselineOutput
from comic.models.comic_net import ComicNet, ComicOutput
from comic.models.gcn import GCNNet
from comic.models.lws import LWSNet

__all__ = ["BackboneWeightsError", "BaselineNet", "BaselineOutput", "ComicNet", "ComicOutput", "FeatureLayer",
           "GCNNet", "LWSNet", "Trunks", "build_trunk"]
