"""HTTP content codings, as Triton's HTTP endpoint takes and gives them: a request body compressed with gzip or
deflate (`Content-Encoding`, tritonclient's `request_compression_algorithm`) and a response compressed the way
the client accepts (`Accept-Encoding`, its `response_compression_algorithm`). "deflate" is the zlib format (RFC
9110). The limit on a body holds for its decompressed size too, so a small compressed body cannot unpack into a
large one."""

import zlib

from maria_onnx.runtime.text import quoted

WBITS = {"gzip": 31, "deflate": 15}  # zlib's window bits: gzip container, zlib container


class EncodingError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as it was before its Content-Encoding, at most `limit` bytes; EncodingError 415 for a coding not
    taken, 413 over the limit, 400 for data that is not of its coding."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in WBITS:
        raise EncodingError(415, f"Content-Encoding {quoted(encoding)} is not supported; send gzip, deflate or none")
    data, rest = b"", body
    while True:  # gzip: one member after another (RFC 1952), as gunzip reads them
        unpacker = zlib.decompressobj(wbits=WBITS[encoding])
        try:
            data += unpacker.decompress(rest, limit + 1 - len(data))
        except zlib.error as error:
            raise EncodingError(400, f"the body is not valid {encoding} data ({error})") from None
        if len(data) > limit:
            raise EncodingError(413, f"the body is over the limit of {limit} bytes once decompressed")
        if not unpacker.eof:
            raise EncodingError(400, f"the {encoding} body ends before its data does")
        rest = unpacker.unused_data
        if not rest:
            return data
        if encoding != "gzip":
            raise EncodingError(400, f"the body holds {len(rest)} bytes after its {encoding} data; send the data alone")


def accepted(accept_encoding: str | None) -> str | None:
    """gzip or deflate where the client's Accept-Encoding takes it (gzip first), else None."""
    taken = set()
    for item in (accept_encoding or "").lower().split(","):
        name, _, parameters = item.strip().partition(";")
        if parameters.replace(" ", "") not in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            taken.add(name.strip())
    return next((name for name in ("gzip", "deflate") if name in taken), None)


def compress(body: bytes, encoding: str) -> bytes:
    packer = zlib.compressobj(wbits=WBITS[encoding])
    return packer.compress(body) + packer.flush()
