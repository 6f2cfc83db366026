//! The dashboard: one page, its script and its style sheet, compiled into
//! the binary (no build chain, nothing fetched from elsewhere) and served
//! without a token. They hold no data: the script asks the API for it,
//! with the bearer token the person types in when the API wants one.
//!
//! Every answer carries a strict Content-Security-Policy (scripts and
//! styles only from these files, requests only to this origin), and an
//! `ETag` from the file's content with `Cache-Control: no-cache`: a
//! browser revalidates each time (a 304 costs only headers) and never mixes
//! the page of one build with the script of another.

/// The policy on every dashboard answer.
pub(crate) const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'none'; \
     frame-ancestors 'none'; base-uri 'none'";

/// One compiled-in file and where it is served.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    /// FNV-1a of the body, computed at compile time: the `ETag`.
    tag: u64,
}

/// FNV-1a (64 bits): enough to tell builds of a file apart, and const.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut index = 0;
    while index < bytes.len() {
        hash ^= bytes[index] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        index += 1;
    }
    hash
}

macro_rules! asset {
    ($path:literal, $file:literal, $content_type:literal) => {
        Asset {
            path: $path,
            content_type: $content_type,
            body: include_bytes!($file),
            tag: fnv1a(include_bytes!($file)),
        }
    };
}

static ASSETS: [Asset; 3] = [
    asset!("/", "dashboard/index.html", "text/html; charset=utf-8"),
    asset!(
        "/dashboard/app.js",
        "dashboard/app.js",
        "text/javascript; charset=utf-8"
    ),
    asset!(
        "/dashboard/style.css",
        "dashboard/style.css",
        "text/css; charset=utf-8"
    ),
];

/// A dashboard answer before the HTTP layer writes it.
#[derive(Debug)]
pub(crate) struct Page {
    /// 200, or 304 when the client's copy is current.
    pub code: u16,
    pub content_type: &'static str,
    /// Empty for a 304.
    pub body: &'static [u8],
    pub headers: Vec<(&'static str, String)>,
}

/// The dashboard's paths (the page and its assets); each is a route of
/// the router's table (checked by its tests).
#[cfg(test)]
pub(crate) fn paths() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|asset| asset.path)
}

/// Whether `path` is one of the dashboard's (the page or an asset).
#[cfg(test)]
fn serves(path: &str) -> bool {
    paths().any(|served| served == path)
}

/// The answer to a GET or HEAD of `path` (one for which [`serves`] is
/// true; anything else is `None`), given the request's `If-None-Match`.
pub(crate) fn serve(path: &str, if_none_match: Option<&str>) -> Option<Page> {
    let asset = ASSETS.iter().find(|asset| asset.path == path)?;
    let etag = format!("\"{:016x}\"", asset.tag);
    let current = if_none_match.is_some_and(|given| matches_etag(given, &etag));
    let headers = vec![
        (
            "Content-Security-Policy",
            CONTENT_SECURITY_POLICY.to_string(),
        ),
        ("X-Content-Type-Options", "nosniff".to_string()),
        // For browsers that predate `frame-ancestors`.
        ("X-Frame-Options", "DENY".to_string()),
        ("Referrer-Policy", "no-referrer".to_string()),
        ("Cache-Control", "no-cache".to_string()),
        ("ETag", etag),
    ];
    Some(Page {
        code: if current { 304 } else { 200 },
        content_type: asset.content_type,
        body: if current { b"" } else { asset.body },
        headers,
    })
}

/// `If-None-Match` against our tag: `*`, or any listed tag equal under
/// the weak comparison (RFC 9110 section 13.1.2).
fn matches_etag(given: &str, etag: &str) -> bool {
    given.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == etag
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(path: &str) -> &'static str {
        let asset = ASSETS.iter().find(|asset| asset.path == path).unwrap();
        std::str::from_utf8(asset.body).unwrap()
    }

    #[test]
    fn tags_follow_content() {
        assert_ne!(fnv1a(b"a"), fnv1a(b"b"));
        let page = serve("/", None).unwrap();
        let etag = page
            .headers
            .iter()
            .find(|(name, _)| *name == "ETag")
            .map(|(_, value)| value.clone())
            .unwrap();
        assert_eq!(page.code, 200);
        assert!(!page.body.is_empty());
        let again = serve("/", Some(&format!("\"x\", W/{etag}"))).unwrap();
        assert_eq!((again.code, again.body.len()), (304, 0));
        assert_eq!(serve("/", Some("*")).unwrap().code, 304);
        assert_eq!(serve("/", Some("\"0000000000000000\"")).unwrap().code, 200);
        assert!(serve("/nope", None).is_none());
    }

    #[test]
    fn the_page_names_only_compiled_in_assets() {
        let page = text("/");
        for reference in page.split(['"', '\'']).filter(|part| part.starts_with('/')) {
            assert!(serves(reference), "index.html refers to {reference}");
        }
        assert!(page.contains("/dashboard/app.js") && page.contains("/dashboard/style.css"));
    }

    /// The policy forbids inline code and styles; the page must not need them.
    #[test]
    fn nothing_inline_that_the_policy_would_block() {
        let page = text("/").to_ascii_lowercase();
        assert!(!page.contains("<style"), "inline <style>");
        assert!(!page.contains(" style="), "inline style attribute");
        assert!(!page.contains("javascript:"), "javascript: URL");
        for script in page.split("<script").skip(1) {
            let tag = script.split('>').next().unwrap_or("");
            assert!(tag.contains(" src="), "inline <script>: <script{tag}>");
        }
        for attribute in page.split_whitespace() {
            let name = attribute.split('=').next().unwrap_or("");
            assert!(
                !(name.starts_with("on") && attribute.contains('=')),
                "inline event handler {attribute}"
            );
        }
        let script = text("/dashboard/app.js");
        for forbidden in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "setAttribute('style'",
        ] {
            assert!(!script.contains(forbidden), "app.js uses {forbidden}");
        }
    }
}
