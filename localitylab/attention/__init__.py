"""Attention, read from any model through one adapter per implementation, and the token
geometry that places queries and keys on the input image in pixels."""

from localitylab.attention.adapters import (AttentionAdapter, CallGeometry, SdpaCall, adapter_for, adapter_names,
                                            register_adapter)
from localitylab.attention import families  # noqa: F401  (registers the adapters of timm's other ViT families)
from localitylab.attention import stage_families  # noqa: F401  (and of those whose tokens change grid by stage)
from localitylab.attention.geometry import TokenGeometry, pixel_distances
from localitylab.attention.reader import (AttentionBlock, AttentionLayer, UnreadLayer, attention_layers, attend,
                                          default_query_block, read_attention, softmax_pieces, unread_attention_classes,
                                          unread_attention_layers)

__all__ = ["AttentionAdapter", "AttentionBlock", "AttentionLayer", "CallGeometry", "SdpaCall", "TokenGeometry",
           "adapter_for", "adapter_names", "attend", "attention_layers", "default_query_block", "pixel_distances",
           "read_attention", "register_adapter", "softmax_pieces", "unread_attention_classes", "UnreadLayer",
           "unread_attention_layers"]
