"""Attention, read from any model through one adapter per implementation, and the token
geometry that places queries and keys on the input image in pixels."""

from localitylab.attention.adapters import (AttentionAdapter, CallGeometry, SdpaCall, adapter_for, adapter_names,
                                            register_adapter)
from localitylab.attention.geometry import TokenGeometry, pixel_distances
from localitylab.attention.reader import (AttentionBlock, AttentionLayer, attention_layers, attend, default_query_block,
                                          read_attention, softmax_pieces, unread_attention_classes)

__all__ = ["AttentionAdapter", "AttentionBlock", "AttentionLayer", "CallGeometry", "SdpaCall", "TokenGeometry",
           "adapter_for", "adapter_names", "attend", "attention_layers", "default_query_block", "pixel_distances",
           "read_attention", "register_adapter", "softmax_pieces", "unread_attention_classes"]
