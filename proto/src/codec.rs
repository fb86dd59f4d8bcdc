//! The codec of every generated service and client: prost, with a small
//! first buffer. Each open stream keeps one encode and one decode buffer
//! for its lifetime; tonic's default (8 KiB each) made every idle agent
//! session cost the control plane 16 KiB for messages of a few dozen bytes
//! (heartbeats and their acks). A buffer grows as a message needs, so a
//! stream carrying large messages (log chunks, followed logs) grows it once.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// First capacity of a stream's encode and decode buffers.
pub const FIRST_BUFFER_BYTES: usize = 1024;

/// Encoded bytes after which an encoding stream yields (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

fn settings() -> BufferSettings {
    BufferSettings::new(FIRST_BUFFER_BYTES, YIELD_THRESHOLD)
}

/// `application/grpc+proto` through prost with small first buffers.
#[derive(Debug, Clone)]
pub struct WireCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for WireCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for WireCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
