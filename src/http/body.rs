//! Request bodies: at most 64 KiB (413 beyond, chunked or not), JSON with unknown fields refused
//! and type errors naming the field (through `serde_path_to_error`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::de::DeserializeOwned;
use warp::Filter;

use crate::error::Error;

/// Largest accepted request body.
pub const MAX_BODY: usize = 64 * 1024;

/// Extracts the body, or an error reply value if it is too large.
pub fn limited() -> impl Filter<Extract = (Result<Bytes, Error>,), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .then(collect)
}

async fn collect<S, B>(len: Option<u64>, stream: S) -> Result<Bytes, Error>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
            let mut stream = std::pin::pin!(stream);
            if len.is_some_and(|l| l > MAX_BODY as u64) {
                return Err(Error::PayloadTooLarge);
            }
            let mut buf = BytesMut::new();
            while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
                let chunk = match chunk {
                    Ok(c) => c,
                    Err(_) => return Err(Error::invalid("body", "could not be read")),
                };
                if buf.len() + chunk.remaining() > MAX_BODY {
                    return Err(Error::PayloadTooLarge);
                }
                buf.put(chunk);
            }
            Ok(buf.freeze())
}

/// Parses a JSON body into `T`, naming the offending field on error.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    if body.is_empty() {
        return Err(Error::invalid("body", "a JSON object is required"));
    }
    let text = std::str::from_utf8(body).map_err(|_| Error::invalid("body", "must be UTF-8 JSON"))?;
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = match inner.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                return Error::invalid("body", format!("malformed JSON: {inner}"));
            }
            _ => inner.to_string(),
        };
        // serde reports "unknown field `x`" at the parent path; name the field itself.
        let field = if let Some(rest) = msg.strip_prefix("unknown field `") {
            // The path already ends with the unknown field's name.
            if path == "." { rest.split('`').next().map(str::to_string) } else { Some(path) }
        } else if msg.starts_with("missing field `") {
            msg.split('`').nth(1).map(|f| if path == "." { f.to_string() } else { format!("{path}.{f}") })
        } else {
            Some(if path == "." { "body".to_string() } else { path })
        };
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        Error::InvalidInput { field, message: msg }
    })
}

