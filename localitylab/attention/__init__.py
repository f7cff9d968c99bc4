"""Attention, read from any model through one adapter per implementation, and the token
geometry that places queries and keys on the input image in pixels."""

from localitylab.attention.adapters import AttentionAdapter, QueryKeys, adapter_for, adapter_names, register_adapter
from localitylab.attention.geometry import TokenGeometry, pixel_distances
from localitylab.attention.reader import (AttentionLayer, attention_layers, default_query_block, read_attention,
                                          unread_attention_classes)

__all__ = ["AttentionAdapter", "AttentionLayer", "QueryKeys", "TokenGeometry", "adapter_for", "adapter_names",
           "attention_layers", "default_query_block", "pixel_distances", "read_attention", "register_adapter",
           "unread_attention_classes"]
