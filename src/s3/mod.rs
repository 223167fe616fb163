//! A small blocking client of S3-compatible object storage: the actions' URLs built by
//! `rusty-s3` (sans-IO), signed with AWS SigV4 in the `Authorization` header ([`sigv4`]) and
//! sent with `ureq`. Objects are written with one PUT, or as a multipart upload above a part
//! size; every upload is checked against the ETag the server answers (the MD5 of the bytes, or
//! of the parts' MD5s for a multipart upload), and every download against its ETag the same
//! way. Endpoint, region and credentials come from the standard AWS environment variables.

use std::time::Duration;

use md5::{Digest, Md5};
use rusty_s3::actions::{CreateMultipartUpload, ListObjectsV2};
use rusty_s3::{Bucket, S3Action, UrlStyle};

pub mod sigv4;

/// Default size of one part of a multipart upload; files above it are uploaded in parts.
pub const DEFAULT_PART_SIZE: usize = 8 << 20;
/// Overrides [`DEFAULT_PART_SIZE`] (bytes; S3 itself needs at least 5 MiB but the last part).
pub const PART_SIZE_ENV: &str = "BCCP_S3_PART_SIZE";
/// How long an action URL is valid (rusty-s3 asks; unused, as requests are signed in headers).
const SIGNED_FOR: Duration = Duration::from_secs(3600);

/// What can go wrong; every message names the `s3://` URI and what was tried.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("invalid S3 URI {0:?}: expected s3://BUCKET[/PREFIX]")]
    BadUri(String),
    #[error("invalid S3 setting {name}={value:?}: {why}")]
    BadSetting {
        name: &'static str,
        value: String,
        why: String,
    },
    #[error(
        "S3 credentials missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (needed for {0})"
    )]
    NoCredentials(String),
    #[error("{uri}: {call} failed at {endpoint}: {message}")]
    Call {
        uri: String,
        call: &'static str,
        endpoint: String,
        message: String,
    },
    #[error("{uri}: checksum mismatch: {message}")]
    Checksum { uri: String, message: String },
}

/// Result alias of S3 calls.
pub type Result<T> = std::result::Result<T, S3Error>;

/// An `s3://bucket/prefix` location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Uri {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl S3Uri {
    /// Parses `s3://BUCKET[/PREFIX]`.
    pub fn parse(uri: &str) -> Result<Self> {
        let bad = || S3Error::BadUri(uri.to_owned());
        let rest = uri.trim().strip_prefix("s3://").ok_or_else(bad)?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(c);
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
            return Err(bad());
        }
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
        })
    }

    /// The key of `rel` under the prefix.
    pub fn key(&self, rel: &str) -> String {
        match self.prefix.is_empty() {
            true => rel.to_owned(),
            false => format!("{}/{rel}", self.prefix),
        }
    }

    /// The location `rel` below this one.
    pub fn join(&self, rel: &str) -> Self {
        Self {
            bucket: self.bucket.clone(),
            prefix: self.key(rel.trim_matches('/')),
        }
    }
}

impl std::fmt::Display for S3Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.is_empty() {
            true => write!(f, "s3://{}", self.bucket),
            false => write!(f, "s3://{}/{}", self.bucket, self.prefix),
        }
    }
}

/// Where and as whom: from the standard AWS environment variables.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`, else AWS's regional endpoint.
    pub endpoint: String,
    /// `AWS_REGION`, else `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: String,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and the optional `AWS_SESSION_TOKEN`.
    pub credentials: Option<(String, String, Option<String>)>,
    /// Files above this many bytes go up in parts of this size ([`PART_SIZE_ENV`]).
    pub part_size: usize,
    /// Path-style URLs (`ENDPOINT/BUCKET/KEY`), as S3-compatible servers expect; AWS's own
    /// endpoint uses virtual hosts.
    pub path_style: bool,
}

impl S3Config {
    /// The configuration the environment gives.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".to_owned());
        let custom = var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL"));
        let path_style = custom.is_some();
        let endpoint = custom.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));
        let credentials = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(k), Some(s)) => Some((k, s, var("AWS_SESSION_TOKEN"))),
            _ => None,
        };
        let part_size = match var(PART_SIZE_ENV) {
            None => DEFAULT_PART_SIZE,
            Some(v) => v
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n >= 1024)
                .ok_or_else(|| S3Error::BadSetting {
                    name: PART_SIZE_ENV,
                    value: v.clone(),
                    why: "expected a whole number of bytes, at least 1024".to_owned(),
                })?,
        };
        Ok(Self {
            endpoint,
            region,
            credentials,
            part_size,
            path_style,
        })
    }
}

/// One uploaded or downloaded object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transferred {
    pub key: String,
    pub bytes: usize,
    /// Parts of a multipart upload (1 for a single PUT).
    pub parts: usize,
}

/// A client of one bucket.
pub struct S3Client {
    bucket: Bucket,
    signer: sigv4::Signer,
    uri: S3Uri,
    endpoint: String,
    part_size: usize,
    agent: ureq::Agent,
}

/// The lowercase hex MD5 of `bytes`.
pub fn md5_hex(bytes: &[u8]) -> String {
    crate::backbone::cache::hex(&Md5::digest(bytes))
}

/// The ETag S3 gives an object uploaded as `parts` (its MD5 for one PUT; the MD5 of the parts'
/// MD5s, then `-N`, for a multipart upload).
pub fn expected_etag(parts: &[&[u8]], multipart: bool) -> String {
    if !multipart {
        return md5_hex(parts.concat().as_slice());
    }
    let mut digests = Vec::with_capacity(parts.len() * 16);
    for p in parts {
        digests.extend_from_slice(&Md5::digest(p));
    }
    format!("{}-{}", md5_hex(&digests), parts.len())
}

impl S3Client {
    /// A client of the bucket of `uri`; nothing is sent yet.
    pub fn new(uri: &S3Uri, cfg: &S3Config) -> Result<Self> {
        let what = uri.to_string();
        let endpoint: url::Url = cfg.endpoint.parse().map_err(|e| S3Error::BadSetting {
            name: "AWS_ENDPOINT_URL",
            value: cfg.endpoint.clone(),
            why: format!("not a URL ({e}); expected http://HOST:PORT or https://…"),
        })?;
        let style = match cfg.path_style {
            true => UrlStyle::Path,
            false => UrlStyle::VirtualHost,
        };
        let bucket =
            Bucket::new(endpoint, style, uri.bucket.clone(), cfg.region.clone()).map_err(|e| {
                S3Error::BadSetting {
                    name: "AWS_ENDPOINT_URL",
                    value: cfg.endpoint.clone(),
                    why: e.to_string(),
                }
            })?;
        let signer = match &cfg.credentials {
            Some((key, secret, token)) => sigv4::Signer {
                key: key.clone(),
                secret: secret.clone(),
                token: token.clone(),
                region: cfg.region.clone(),
            },
            None => return Err(S3Error::NoCredentials(what)),
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout(Duration::from_secs(600))
            .build();
        Ok(Self {
            bucket,
            signer,
            uri: uri.clone(),
            endpoint: cfg.endpoint.clone(),
            part_size: cfg.part_size,
            agent,
        })
    }

    /// The bucket and prefix this client was made for.
    pub fn uri(&self) -> &S3Uri {
        &self.uri
    }

    fn fail(&self, key: &str, call: &'static str, message: String) -> S3Error {
        S3Error::Call {
            uri: format!("s3://{}/{key}", self.uri.bucket),
            call,
            endpoint: self.endpoint.clone(),
            message,
        }
    }

    /// A `method` request of the action URL `url` (unsigned) carrying `body`, signed.
    fn signed(&self, method: &str, url: url::Url, body: &[u8]) -> ureq::Request {
        let (url, headers) = self.signer.sign(method, url, body, &sigv4::amz_date_now());
        headers
            .into_iter()
            .fold(self.agent.request(method, url.as_str()), |req, (k, v)| {
                req.set(k, &v)
            })
    }

    /// Sends a signed request; a refusal keeps S3's error code and message.
    fn send(
        &self,
        key: &str,
        call: &'static str,
        result: std::result::Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response> {
        match result {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(status, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let tag = |t: &str| {
                    let open = format!("<{t}>");
                    let start = text.find(&open)? + open.len();
                    let end = text[start..].find(&format!("</{t}>"))? + start;
                    Some(text[start..end].to_owned())
                };
                let message = match (tag("Code"), tag("Message")) {
                    (Some(code), Some(msg)) => format!("refused (HTTP {status} {code}): {msg}"),
                    (Some(code), None) => format!("refused (HTTP {status} {code})"),
                    _ => format!("refused (HTTP {status}) {}", text.trim()),
                };
                Err(self.fail(key, call, message))
            }
            Err(ureq::Error::Transport(t)) => Err(self.fail(
                key,
                call,
                format!("cannot reach the endpoint ({t}); check AWS_ENDPOINT_URL"),
            )),
        }
    }

    fn etag_of(resp: &ureq::Response) -> String {
        resp.header("ETag")
            .unwrap_or_default()
            .trim_matches('"')
            .to_owned()
    }

    /// Uploads `bytes` as `key` (one PUT up to the part size, else a multipart upload) and
    /// checks the ETag the server answers against the bytes' MD5s.
    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<Transferred> {
        if bytes.len() <= self.part_size {
            let url = self.bucket.put_object(None, key).sign(SIGNED_FOR);
            let resp = self.send(
                key,
                "PutObject",
                self.signed("PUT", url, bytes).send_bytes(bytes),
            )?;
            self.check(key, &Self::etag_of(&resp), &[bytes], false)?;
            return Ok(Transferred {
                key: key.to_owned(),
                bytes: bytes.len(),
                parts: 1,
            });
        }
        let parts: Vec<&[u8]> = bytes.chunks(self.part_size).collect();
        if parts.len() > 10_000 {
            return Err(self.fail(
                key,
                "CreateMultipartUpload",
                format!(
                    "{} bytes need {} parts of {} bytes, over S3's 10000: raise {PART_SIZE_ENV}",
                    bytes.len(),
                    parts.len(),
                    self.part_size
                ),
            ));
        }
        let url = self
            .bucket
            .create_multipart_upload(None, key)
            .sign(SIGNED_FOR);
        let call = "CreateMultipartUpload";
        let resp = self.send(key, call, self.signed("POST", url, b"").call())?;
        let text = resp
            .into_string()
            .map_err(|e| self.fail(key, call, format!("reading the answer: {e}")))?;
        let created = CreateMultipartUpload::parse_response(&text)
            .map_err(|e| self.fail(key, call, format!("unexpected answer ({e}): {text}")))?;
        let upload_id = created.upload_id().to_owned();
        let uploaded = self.upload_parts(key, &upload_id, &parts);
        match uploaded {
            Ok(()) => Ok(Transferred {
                key: key.to_owned(),
                bytes: bytes.len(),
                parts: parts.len(),
            }),
            Err(e) => {
                // Best effort: free the parts stored so far.
                let url = self
                    .bucket
                    .abort_multipart_upload(None, key, &upload_id)
                    .sign(SIGNED_FOR);
                let _ = self.signed("DELETE", url, b"").call();
                Err(e)
            }
        }
    }

    fn upload_parts(&self, key: &str, upload_id: &str, parts: &[&[u8]]) -> Result<()> {
        let mut etags = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let number = u16::try_from(i + 1).unwrap_or(u16::MAX);
            let url = self
                .bucket
                .upload_part(None, key, number, upload_id)
                .sign(SIGNED_FOR);
            let resp = self.send(
                key,
                "UploadPart",
                self.signed("PUT", url, part).send_bytes(part),
            )?;
            let etag = Self::etag_of(&resp);
            self.check(key, &etag, &[part], false)
                .map_err(|e| self.fail(key, "UploadPart", format!("part {number}: {e}")))?;
            etags.push(etag);
        }
        let action = self.bucket.complete_multipart_upload(
            None,
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGNED_FOR);
        let body = action.body();
        let call = "CompleteMultipartUpload";
        let resp = self.send(
            key,
            call,
            self.signed("POST", url, body.as_bytes()).send_string(&body),
        )?;
        let text = resp
            .into_string()
            .map_err(|e| self.fail(key, call, format!("reading the answer: {e}")))?;
        // S3 may answer 200 with an error document.
        if text.contains("<Error>") {
            return Err(self.fail(key, call, format!("refused: {text}")));
        }
        let etag = text
            .split_once("<ETag>")
            .and_then(|(_, r)| r.split_once("</ETag>"))
            .map(|(e, _)| {
                e.replace("&quot;", "")
                    .replace("&#34;", "")
                    .replace('"', "")
            })
            .unwrap_or_default();
        self.check(key, &etag, parts, true)
    }

    /// Compares an ETag with the one `parts` should have.
    fn check(&self, key: &str, etag: &str, parts: &[&[u8]], multipart: bool) -> Result<()> {
        let want = expected_etag(parts, multipart);
        if etag.eq_ignore_ascii_case(&want) {
            return Ok(());
        }
        Err(S3Error::Checksum {
            uri: format!("s3://{}/{key}", self.uri.bucket),
            message: format!("the server's ETag {etag:?} is not the bytes' {want:?}"),
        })
    }

    /// Downloads `key`, checking its bytes against the ETag (a single-PUT object's MD5; for a
    /// multipart object, against the ETag its parts at the configured part size give).
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let url = self.bucket.get_object(None, key).sign(SIGNED_FOR);
        let call = "GetObject";
        let resp = self.send(key, call, self.signed("GET", url, b"").call())?;
        let etag = Self::etag_of(&resp);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut resp.into_reader(), &mut bytes)
            .map_err(|e| self.fail(key, call, format!("reading the object: {e}")))?;
        match etag.split_once('-') {
            None => self.check(key, &etag, &[&bytes], false)?,
            Some((_, n)) => {
                let n: usize = n.parse().unwrap_or(0);
                let size = bytes.len().div_ceil(n.max(1));
                // Parts are all one size but the last: the size that gives n parts.
                let candidates = [self.part_size, size];
                let ok = candidates.iter().any(|&s| {
                    s > 0
                        && bytes.len().div_ceil(s) == n
                        && etag.eq_ignore_ascii_case(&expected_etag(
                            &bytes.chunks(s).collect::<Vec<_>>(),
                            true,
                        ))
                });
                if !ok {
                    return Err(S3Error::Checksum {
                        uri: format!("s3://{}/{key}", self.uri.bucket),
                        message: format!(
                            "the multipart ETag {etag:?} matches no split of the {} bytes read",
                            bytes.len()
                        ),
                    });
                }
            }
        }
        Ok(bytes)
    }

    /// Every key under `prefix` (all pages), with its size.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        let call = "ListObjectsV2";
        loop {
            let mut action = self.bucket.list_objects_v2(None);
            action.with_prefix(prefix);
            if let Some(t) = &token {
                action.with_continuation_token(t.clone());
            }
            let url = action.sign(SIGNED_FOR);
            let resp = self.send(prefix, call, self.signed("GET", url, b"").call())?;
            let text = resp
                .into_string()
                .map_err(|e| self.fail(prefix, call, format!("reading the answer: {e}")))?;
            let page = ListObjectsV2::parse_response(&text)
                .map_err(|e| self.fail(prefix, call, format!("unexpected answer ({e})")))?;
            out.extend(page.contents.into_iter().map(|c| (c.key, c.size)));
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => return Ok(out),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_and_join() {
        let u = S3Uri::parse("s3://my-bucket/runs/x/").unwrap();
        assert_eq!(u.bucket, "my-bucket");
        assert_eq!(u.prefix, "runs/x");
        assert_eq!(
            u.key("m/1/model.safetensors"),
            "runs/x/m/1/model.safetensors"
        );
        assert_eq!(u.join("m/1").to_string(), "s3://my-bucket/runs/x/m/1");
        let bare = S3Uri::parse("s3://abc").unwrap();
        assert_eq!((bare.prefix.as_str(), bare.key("f")), ("", "f".to_owned()));
        assert_eq!(bare.to_string(), "s3://abc");
        for bad in ["http://b/x", "s3://", "s3://ab", "s3://Upper/x", "bucket/x"] {
            let err = S3Uri::parse(bad).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("s3://BUCKET"), "{err}");
        }
    }

    #[test]
    fn etags_of_single_and_multipart_uploads() {
        // MD5 of "" and of "abc" (RFC 1321's test suite).
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(expected_etag(&[b"a", b"bc"], false), md5_hex(b"abc"));
        // Multipart: MD5 of the concatenated binary part digests, then the part count.
        let mut cat = Vec::new();
        cat.extend_from_slice(&Md5::digest(b"a"));
        cat.extend_from_slice(&Md5::digest(b"bc"));
        assert_eq!(
            expected_etag(&[b"a", b"bc"], true),
            format!("{}-2", md5_hex(&cat))
        );
    }
}
