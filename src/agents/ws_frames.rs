//! The size of the WebSocket messages an agent sends, read from the frame headers as the
//! bytes come in (RFC 6455 §5.2), so that a message over `limits.max_packet_bytes` is
//! refused with a log line and a metric of ours before its payload is read.
//!
//! engineioxide hands the limit to tungstenite, which refuses such a message too, but the
//! session then ends as any broken connection does (a transport error, nothing counted).
//! This reader only looks at headers and skips payloads: it buffers nothing but the at
//! most 14 bytes of one header. It starts at the first byte read after the gateway
//! accepted the upgrade, which is the first frame: a client must wait for the server's
//! `101` before it sends one (RFC 6455 §4.1).

/// Where the reader is in the stream of frames.
#[derive(Debug, Clone)]
pub(crate) struct FrameSizes {
    limit: u64,
    state: State,
    /// Payload bytes of the data message in progress (its frames so far).
    message: u64,
}

#[derive(Debug, Clone)]
enum State {
    /// Reading a frame header: the bytes so far.
    Header { bytes: [u8; 14], len: usize },
    /// Skipping this many payload bytes.
    Payload(u64),
}

/// A data message larger than the limit: the size known so far (its frames up to the one
/// that passed the limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Oversized(pub(crate) u64);

impl FrameSizes {
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            limit,
            state: State::Header {
                bytes: [0; 14],
                len: 0,
            },
            message: 0,
        }
    }

    /// Reads the next bytes of the stream.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> Result<(), Oversized> {
        while !data.is_empty() {
            match &mut self.state {
                State::Payload(left) => {
                    let n = (*left).min(data.len() as u64);
                    *left -= n;
                    // `n` is at most `data.len()`, so it fits a usize.
                    data = &data[n as usize..];
                    if *left == 0 {
                        self.state = State::Header {
                            bytes: [0; 14],
                            len: 0,
                        };
                    }
                }
                State::Header { bytes, len } => {
                    bytes[*len] = data[0];
                    *len += 1;
                    data = &data[1..];
                    if let Some((opcode, payload)) = header(&bytes[..*len]) {
                        // Continuation frames (0) add to the message; text (1) and binary
                        // (2) start one; control frames (8 and up) stand alone.
                        match opcode {
                            0 => self.message = self.message.saturating_add(payload),
                            1 | 2 => self.message = payload,
                            _ => {}
                        }
                        if opcode < 8 && self.message > self.limit {
                            return Err(Oversized(self.message));
                        }
                        self.state = if payload == 0 {
                            State::Header {
                                bytes: [0; 14],
                                len: 0,
                            }
                        } else {
                            State::Payload(payload)
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

/// The opcode and payload length of a complete frame header, `None` while bytes are
/// missing.
fn header(bytes: &[u8]) -> Option<(u8, u64)> {
    let [first, second, rest @ ..] = bytes else {
        return None;
    };
    let masked = second & 0x80 != 0;
    let (extended, payload) = match second & 0x7f {
        126 => (
            2,
            u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
        ),
        127 => (8, u64::from_be_bytes(rest.get(..8)?.try_into().ok()?)),
        n => (0, u64::from(n)),
    };
    let needed = 2 + extended + if masked { 4 } else { 0 };
    (bytes.len() == needed).then_some((first & 0x0f, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame (RFC 6455 §5.3) with `payload` bytes.
    fn frame(fin: bool, opcode: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![u8::from(fin) << 7 | opcode];
        match payload {
            0..=125 => f.push(0x80 | payload as u8),
            126..=65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(payload as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(payload as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(b'x', payload));
        f
    }

    #[test]
    fn messages_up_to_the_limit_pass_in_any_split() {
        let mut stream = frame(true, 1, 100);
        stream.extend(frame(true, 9, 4));
        stream.extend(frame(true, 2, 1000));
        stream.extend(frame(false, 1, 60_000));
        stream.extend(frame(true, 0, 40_000));
        for chunk in [1, 7, 4096, stream.len()] {
            let mut sizes = FrameSizes::new(100_000);
            for part in stream.chunks(chunk) {
                assert_eq!(sizes.feed(part), Ok(()), "chunks of {chunk}");
            }
        }
    }

    #[test]
    fn a_message_over_the_limit_is_found_at_its_header() {
        let mut sizes = FrameSizes::new(1000);
        assert_eq!(sizes.feed(&frame(true, 1, 1000)), Ok(()));
        let big = frame(true, 1, 1001);
        assert_eq!(sizes.feed(&big[..8]), Err(Oversized(1001)));
        // Fragments add up: two frames of 600 are one message of 1200.
        let mut sizes = FrameSizes::new(1000);
        assert_eq!(sizes.feed(&frame(false, 2, 600)), Ok(()));
        assert_eq!(sizes.feed(&frame(true, 0, 600)), Err(Oversized(1200)));
        // A 64-bit length is read whole.
        let mut sizes = FrameSizes::new(1 << 20);
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(sizes.feed(&huge), Ok(()));
        assert_eq!(sizes.feed(&[1, 2, 3, 4]), Err(Oversized(1 << 40)));
    }
}
