//! Forwards a `Prove` call to a worker as the client sent it: the request message and the proof
//! travel as opaque bytes, never decoded into a `ProofRequest` and encoded again. The proxy only
//! reads the request's `proof_type` (skipping the payload without copying it).

use bytes::{Buf, BufMut, Bytes};
use http::uri::PathAndQuery;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::wire::{MAX_MESSAGE_SIZE, NOT_READY, PROVE_PATH};

/// The fields of a `ProofRequest` the proxy looks at; prost skips the payload field.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestHead {
    /// `remote_prover.ProofType`, as on the wire.
    #[prost(int32, tag = "1")]
    pub proof_type: i32,
}

/// Calls `remote_prover.Api/Prove` on `channel` with an already encoded `ProofRequest`; the answer
/// is the encoded `Proof`.
pub async fn prove(channel: Channel, request: Request<Bytes>) -> Result<Response<Bytes>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    // The generated clients report a channel that is not ready the same way.
    grpc.ready().await.map_err(|err| Status::unknown(format!("{NOT_READY}: {err}")))?;
    grpc.unary(request, PathAndQuery::from_static(PROVE_PATH), Raw).await
}

/// Whether a failed call never reached the worker (it could not be connected to, or its
/// connection was not ready): the worker cannot have died of this request.
pub fn never_sent(status: &Status) -> bool {
    if status.message().starts_with(NOT_READY) {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// A codec that passes messages through as bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
