//! AWS Signature Version 4 for S3 in the `Authorization` header, as the AWS CLI and boto3 sign:
//! the method, the path, the query (rewritten into AWS's canonical encoding, so the URL sent is
//! the one signed), and the headers `host`, `x-amz-content-sha256` (the payload's SHA-256, so
//! the server checks the body too), `x-amz-date` and, with temporary credentials,
//! `x-amz-security-token`. rusty-s3 builds the actions' URLs but signs only in the query string
//! (presigned URLs), which some S3-compatible servers do not check against their keys (moto).

use hmac::{Hmac, KeyInit, Mac};
use sha2_v011::Sha256;
use url::Url;

use crate::backbone::cache::hex;
use crate::hash::sha256_hex;

type HmacSha256 = Hmac<Sha256>;

/// Who signs, for which region.
#[derive(Debug, Clone)]
pub struct Signer {
    pub key: String,
    pub secret: String,
    /// `AWS_SESSION_TOKEN` of temporary credentials.
    pub token: Option<String>,
    pub region: String,
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    // HMAC takes keys of any length: `new_from_slice` cannot fail here.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of any length"),
    };
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// AWS's URI encoding of a query name or value: unreserved characters (`A-Z a-z 0-9 - _ . ~`)
/// kept, every other byte `%XX` in upper case.
fn uri_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `YYYYMMDDTHHMMSSZ` of Unix seconds (the `x-amz-date` format).
pub fn amz_date(unix_seconds: i64) -> String {
    crate::data::timestamp::format_utc(unix_seconds).replace(['-', ':'], "")
}

/// The current time as [`amz_date`].
pub fn amz_date_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    amz_date(secs)
}

impl Signer {
    /// Signs a `method` request of `url` (an action URL, unsigned) carrying `payload` at
    /// `date` ([`amz_date`]): returns the URL to send (its query in canonical form) and the
    /// headers to add (`host` is the URL's, which the HTTP client sends itself).
    pub fn sign(
        &self,
        method: &str,
        mut url: Url,
        payload: &[u8],
        date: &str,
    ) -> (Url, Vec<(&'static str, String)>) {
        // Query: decoded, re-encoded the AWS way, sorted; a name without value is sent bare
        // (`?uploads`) and signed as `uploads=`.
        let mut pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (uri_encode(&k), uri_encode(&v)))
            .collect();
        pairs.sort();
        let canonical_query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let sent_query: Vec<String> = pairs
            .iter()
            .map(|(k, v)| match v.is_empty() {
                true => k.clone(),
                false => format!("{k}={v}"),
            })
            .collect();
        url.set_query((!pairs.is_empty()).then(|| sent_query.join("&")).as_deref());
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => String::new(),
        };
        let payload_hash = sha256_hex(payload);
        let mut headers: Vec<(&'static str, String)> = vec![
            ("host", host),
            ("x-amz-content-sha256", payload_hash.clone()),
            ("x-amz-date", date.to_owned()),
        ];
        if let Some(token) = &self.token {
            headers.push(("x-amz-security-token", token.clone()));
        }
        let signed: Vec<&str> = headers.iter().map(|(k, _)| *k).collect();
        let signed = signed.join(";");
        let canonical_headers: String = headers
            .iter()
            .map(|(k, v)| format!("{k}:{}\n", v.trim()))
            .collect();
        let path = match url.path() {
            "" => "/",
            p => p,
        };
        let canonical = format!(
            "{method}\n{path}\n{}\n{canonical_headers}\n{signed}\n{payload_hash}",
            canonical_query.join("&")
        );
        let day = &date[..8.min(date.len())];
        let scope = format!("{day}/{}/s3/aws4_request", self.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{date}\n{scope}\n{}",
            sha256_hex(canonical.as_bytes())
        );
        let mut key = hmac(format!("AWS4{}", self.secret).as_bytes(), day);
        for part in [self.region.as_str(), "s3", "aws4_request"] {
            key = hmac(&key, part);
        }
        let signature = hex(&hmac(&key, &to_sign));
        headers.remove(0); // host: the HTTP client's own
        headers.push((
            "Authorization",
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed}, Signature={signature}",
                self.key
            ),
        ));
        (url, headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Signer {
        // The example credentials of AWS's S3 SigV4 documentation.
        Signer {
            key: "AKIAIOSFODNN7EXAMPLE".to_owned(),
            secret: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".to_owned(),
            token: None,
            region: "us-east-1".to_owned(),
        }
    }

    fn authorization(headers: &[(&str, String)]) -> String {
        headers
            .iter()
            .find(|(k, _)| *k == "Authorization")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// AWS's documented examples "GET Bucket Lifecycle" and "Get Bucket (List Objects)".
    #[test]
    fn signs_as_the_aws_documentation_examples() {
        let date = amz_date(1_369_353_600); // Fri, 24 May 2013 00:00:00 GMT
        assert_eq!(date, "20130524T000000Z");
        let url = Url::parse("https://examplebucket.s3.amazonaws.com/?lifecycle").unwrap();
        let (sent, headers) = example().sign("GET", url, b"", &date);
        assert_eq!(
            sent.as_str(),
            "https://examplebucket.s3.amazonaws.com/?lifecycle"
        );
        assert_eq!(
            authorization(&headers),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;x-amz-content-sha256;x-amz-date, \
             Signature=fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543"
        );
        assert!(headers.contains(&(
            "x-amz-content-sha256",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".to_owned()
        )));
        // The query is sorted before signing.
        let url =
            Url::parse("https://examplebucket.s3.amazonaws.com/?prefix=J&max-keys=2").unwrap();
        let (sent, headers) = example().sign("GET", url, b"", &date);
        assert_eq!(sent.query(), Some("max-keys=2&prefix=J"));
        assert!(authorization(&headers).ends_with(
            "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
        ));
    }

    #[test]
    fn queries_are_re_encoded_the_aws_way_and_tokens_signed() {
        let url = Url::parse("http://127.0.0.1:9000/b/k?prefix=a%2Fb+c&list-type=2").unwrap();
        let mut signer = example();
        signer.token = Some("tok".to_owned());
        let (sent, headers) = signer.sign("GET", url, b"x", "20240101T000000Z");
        assert_eq!(sent.query(), Some("list-type=2&prefix=a%2Fb%20c"));
        assert_eq!(sent.port(), Some(9000));
        let names: Vec<&str> = headers.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "x-amz-content-sha256",
                "x-amz-date",
                "x-amz-security-token",
                "Authorization"
            ]
        );
        assert!(authorization(&headers)
            .contains("SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token,"));
        assert_eq!(headers[0].1, sha256_hex(b"x"));
        // Another secret, another signature.
        let other = Signer {
            secret: "other".to_owned(),
            ..example()
        };
        let url = Url::parse("http://127.0.0.1:9000/b/k").unwrap();
        let a = authorization(
            &example()
                .sign("PUT", url.clone(), b"x", "20240101T000000Z")
                .1,
        );
        let b = authorization(&other.sign("PUT", url, b"x", "20240101T000000Z").1);
        assert_ne!(a, b);
    }
}
