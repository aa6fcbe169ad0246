"""The Scalebox wire protocol: the sandboxagent messages (generated from sandboxagent.proto), the Connect codec
and the MIME mapping. Everything that crosses the wire is encoded or decoded here."""

from . import sandboxagent_pb2 as pb
from .connect import JSON, PROTO, Codec, ConnectError, EnvelopeReader, codec_for, end_stream, envelope

__all__ = ["JSON", "PROTO", "Codec", "ConnectError", "EnvelopeReader", "codec_for", "end_stream", "envelope", "pb"]
