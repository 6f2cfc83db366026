//! The request body as JSON, read in one pass: every top-level field as a
//! `serde_json::Value`, except `attachments`, whose strings are borrowed
//! from the body where it holds them unescaped. An attachment's base64 text
//! (the bulk of a large request) is then decoded straight from the request
//! bytes, with no second copy of it in memory.

use std::borrow::Cow;
use std::fmt;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// A parsed request body.
pub(crate) struct Body<'a> {
    /// Every top-level field but `attachments`.
    pub fields: Map<String, Value>,
    /// The `attachments` field, when present.
    pub attachments: Option<Attachments<'a>>,
    /// The first top-level field given more than once: refused, since
    /// parsers differ on which one they keep (one in front of us may have
    /// checked the other).
    pub repeated: Option<String>,
}

/// A field that should be an array: its items (at most `KEEP`: the rest
/// are only [`Checked`], so a huge array costs no memory past its limit),
/// or the value it was instead (null, or a wrong type).
pub(crate) enum ListOr<T, const KEEP: usize = { usize::MAX }> {
    /// An array.
    List(Vec<T>),
    /// Anything else.
    Other(Value),
}

/// The `attachments` field.
pub(crate) type Attachments<'a> = ListOr<Item<'a>>;

/// One element of `attachments`.
pub(crate) enum Item<'a> {
    /// An object's fields, in order.
    Object(Vec<(String, Field<'a>)>),
    /// Not an object.
    Other,
}

/// A field of an attachment object.
pub(crate) enum Field<'a> {
    /// A string, borrowed from the body when it had no escapes.
    Text(Cow<'a, str>),
    /// Anything else.
    Other(Value),
}

/// Parses `body`. A valid JSON document that is not an object is an error
/// of category `Data`; malformed JSON of category `Syntax` or `Eof`.
pub(super) fn parse(body: &[u8]) -> Result<Body<'_>, serde_json::Error> {
    serde_json::from_slice(body).map_err(|error| classified(body, error))
}

/// `error` as the category promised above: the wrong top-level type is
/// refused before the rest is read, so a document such as `[x` would be
/// "not an object" instead of the malformed JSON it is.
fn classified(body: &[u8], error: serde_json::Error) -> serde_json::Error {
    use serde_json::error::Category;
    if error.classify() == Category::Data {
        if let Err(malformed) = serde_json::from_slice::<Checked>(body) {
            if malformed.classify() != Category::Data {
                return malformed;
            }
        }
    }
    error
}

impl<'de> Deserialize<'de> for Body<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BodyVisitor;
        impl<'de> Visitor<'de> for BodyVisitor {
            type Value = Body<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Body<'de>, A::Error> {
                Body::from_map(map)
            }
        }
        deserializer.deserialize_any(BodyVisitor)
    }
}

impl<'de> Body<'de> {
    /// Reads a request object's fields (the body, or a batch item).
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Body<'de>, A::Error> {
        let mut fields = Map::new();
        let mut attachments = None;
        let mut repeated = None;
        while let Some(key) = map.next_key::<String>()? {
            let again = if key == "attachments" {
                attachments
                    .replace(map.next_value::<Attachments<'de>>()?)
                    .is_some()
            } else {
                let value: Value = map.next_value()?;
                fields.insert(key.clone(), value).is_some()
            };
            if again && repeated.is_none() {
                repeated = Some(key);
            }
        }
        Ok(Body {
            fields,
            attachments,
            repeated,
        })
    }
}

/// Turns what a visitor saw into a `Value` (for the "anything else" cases).
struct ValueOf;

impl ValueOf {
    fn seq<'de, A: SeqAccess<'de>>(seq: A) -> Result<Value, A::Error> {
        Value::deserialize(SeqAccessDeserializer::new(seq))
    }

    fn map<'de, A: MapAccess<'de>>(map: A) -> Result<Value, A::Error> {
        Value::deserialize(MapAccessDeserializer::new(map))
    }
}

/// The primitive cases shared by the visitors below, each building `$make(Value)`.
macro_rules! other_primitives {
    ($make:expr) => {
        fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<Self::Value, E> {
            Ok($make(Value::Bool(value)))
        }
        fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Self::Value, E> {
            Ok($make(Value::from(value)))
        }
        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Self::Value, E> {
            Ok($make(Value::from(value)))
        }
        fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<Self::Value, E> {
            Ok($make(Value::from(value)))
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok($make(Value::Null))
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok($make(Value::Null))
        }
    };
}

impl<'de, T: Deserialize<'de>, const KEEP: usize> Deserialize<'de> for ListOr<T, KEEP> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor<T, const KEEP: usize>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const KEEP: usize> Visitor<'de> for ListVisitor<T, KEEP> {
            type Value = ListOr<T, KEEP>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while items.len() < KEEP {
                    match seq.next_element::<T>()? {
                        Some(item) => items.push(item),
                        None => return Ok(ListOr::List(items)),
                    }
                }
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(ListOr::List(items))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Ok(ListOr::Other(ValueOf::map(map)?))
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(ListOr::Other(Value::String(value.to_string())))
            }

            other_primitives!(ListOr::Other);
        }
        deserializer.deserialize_any(ListVisitor(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for Item<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = Item<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(3);
                while let Some(key) = map.next_key::<String>()? {
                    let value: Field<'de> = map.next_value()?;
                    fields.push((key, value));
                }
                Ok(Item::Object(fields))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // Checked, not skipped (see `Checked`).
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(Item::Other)
            }

            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Item::Other)
            }

            other_primitives!(|_: Value| Item::Other);
        }
        deserializer.deserialize_any(ItemVisitor)
    }
}

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = Field<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                value: &'de str,
            ) -> Result<Self::Value, E> {
                Ok(Field::Text(Cow::Borrowed(value)))
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(Field::Text(Cow::Owned(value.to_string())))
            }

            fn visit_string<E: serde::de::Error>(self, value: String) -> Result<Self::Value, E> {
                Ok(Field::Text(Cow::Owned(value)))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Ok(Field::Other(ValueOf::seq(seq)?))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Ok(Field::Other(ValueOf::map(map)?))
            }

            other_primitives!(Field::Other);
        }
        deserializer.deserialize_any(FieldVisitor)
    }
}

/// A batch body, `{"messages": [...]}`, read in one pass: each item as a
/// request body is read (borrowed attachments, repeated fields noted), so
/// an item is parsed once and checked like a single request.
pub(crate) struct BatchBody<'a> {
    /// The first top-level field other than `messages` (refused).
    pub unknown: Option<String>,
    /// The `messages` field, when present.
    pub messages: Option<Messages<'a>>,
    /// `messages` was given more than once.
    pub repeated: bool,
}

/// The `messages` field of a batch: one item past the limit is kept, to
/// say there are too many.
pub(crate) type Messages<'a> = ListOr<BatchItem<'a>, { MAX_BATCH + 1 }>;

/// Items a batch may hold.
pub const MAX_BATCH: usize = 500;

/// Parses a batch body. A valid JSON document that is not an object is an
/// error of category `Data`; malformed JSON of category `Syntax` or `Eof`.
pub(crate) fn parse_batch(body: &[u8]) -> Result<BatchBody<'_>, serde_json::Error> {
    serde_json::from_slice(body).map_err(|error| classified(body, error))
}

impl<'de> Deserialize<'de> for BatchBody<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BatchVisitor;
        impl<'de> Visitor<'de> for BatchVisitor {
            type Value = BatchBody<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut batch = BatchBody {
                    unknown: None,
                    messages: None,
                    repeated: false,
                };
                while let Some(key) = map.next_key::<String>()? {
                    if key == "messages" {
                        let messages = map.next_value::<Messages<'de>>()?;
                        batch.repeated |= batch.messages.replace(messages).is_some();
                    } else {
                        // Checked, not skipped (see `Checked`).
                        map.next_value::<Checked>()?;
                        batch.unknown.get_or_insert(key);
                    }
                }
                Ok(batch)
            }
        }
        deserializer.deserialize_any(BatchVisitor)
    }
}

/// One element of a batch's `messages`: a request object, or `None`.
pub(crate) struct BatchItem<'a>(pub Option<Body<'a>>);

impl<'de> Deserialize<'de> for BatchItem<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BatchItemVisitor;
        impl<'de> Visitor<'de> for BatchItemVisitor {
            type Value = BatchItem<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Ok(BatchItem(Some(Body::from_map(map)?)))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // Checked, not skipped (see `Checked`).
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(BatchItem(None))
            }

            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(BatchItem(None))
            }

            other_primitives!(|_: Value| BatchItem(None));
        }
        deserializer.deserialize_any(BatchItemVisitor)
    }
}

/// A value read and checked as a `Value` would be (UTF-8, escapes, number
/// range, nesting depth), then forgotten: what a request does not use
/// costs no memory. (serde's `IgnoredAny` skips text without checking it.)
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CheckedVisitor;
        impl<'de> Visitor<'de> for CheckedVisitor {
            type Value = Checked;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<Checked>()?.is_some() {}
                Ok(Checked)
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<Checked, Checked>()?.is_some() {}
                Ok(Checked)
            }

            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Checked)
            }

            other_primitives!(|_: Value| Checked);
        }
        deserializer.deserialize_any(CheckedVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_strings_are_borrowed_unless_escaped() {
        let body = br#"{"sender":"a","attachments":[{"content":"aGk=","filename":"a\/b"},5,[1,{"x":2}]],"n":[1]}"#;
        let parsed = parse(body).unwrap();
        assert_eq!(parsed.fields["sender"], "a");
        assert_eq!(parsed.fields["n"], serde_json::json!([1]));
        let Some(Attachments::List(items)) = parsed.attachments else {
            panic!("a list")
        };
        assert_eq!(items.len(), 3);
        let Item::Object(fields) = &items[0] else {
            panic!("an object")
        };
        assert!(matches!(&fields[0].1, Field::Text(Cow::Borrowed("aGk="))));
        assert!(matches!(&fields[1].1, Field::Text(Cow::Owned(name)) if name == "a/b"));
        assert!(matches!(items[1], Item::Other));
    }

    #[test]
    fn a_batch_is_read_in_one_pass() {
        let body = br#"{"x":1,"messages":[{"subject":"a","subject":"b","attachments":[{"content":"aGk="}]},[1],"s",{}],"y":{}}"#;
        let batch = parse_batch(body).unwrap();
        assert_eq!(batch.unknown.as_deref(), Some("x"));
        assert!(!batch.repeated);
        let Some(Messages::List(items)) = batch.messages else {
            panic!("a list")
        };
        let items: Vec<Option<Body>> = items.into_iter().map(|item| item.0).collect();
        assert_eq!(items.len(), 4);
        let first = items[0].as_ref().unwrap();
        assert_eq!(first.repeated.as_deref(), Some("subject"));
        let Some(Attachments::List(attachments)) = &first.attachments else {
            panic!("attachments")
        };
        let Item::Object(fields) = &attachments[0] else {
            panic!("an object")
        };
        assert!(matches!(&fields[0].1, Field::Text(Cow::Borrowed("aGk="))));
        assert!(items[1].is_none() && items[2].is_none());
        assert!(items[3].as_ref().unwrap().fields.is_empty());

        assert!(
            parse_batch(br#"{"messages":[],"messages":[]}"#)
                .unwrap()
                .repeated
        );
        assert!(matches!(
            parse_batch(br#"{"messages":{"a":[1]}}"#).unwrap().messages,
            Some(Messages::Other(_))
        ));
        use serde_json::error::Category;
        assert_eq!(parse_batch(b"[]").err().unwrap().classify(), Category::Data);
        assert_eq!(
            parse_batch(b"{\"messages\":[").err().unwrap().classify(),
            Category::Eof
        );
        // What is skipped is still checked: a lone surrogate, bytes that
        // are not UTF-8, nesting past serde_json's limit.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for bad in [
            r#"["\ud800"]"#.as_bytes(),
            b"[\"\xff\xfe\"]",
            b"[{\"\xff\":1}]",
            b"[1e999]",
            deep.as_bytes(),
        ] {
            let mut item = b"{\"messages\":[".to_vec();
            item.extend_from_slice(bad);
            item.extend_from_slice(b",{}]}");
            assert!(
                parse_batch(&item).is_err(),
                "{}",
                String::from_utf8_lossy(&item)
            );
            let mut field = b"{\"x\":".to_vec();
            field.extend_from_slice(bad);
            field.extend_from_slice(b",\"messages\":[]}");
            assert!(parse_batch(&field).is_err());
            let mut attachment = b"{\"attachments\":[".to_vec();
            attachment.extend_from_slice(bad);
            attachment.extend_from_slice(b"]}");
            assert!(parse(&attachment).is_err());
        }
        // A huge array keeps one item past the limit.
        let many = format!("{{\"messages\":[{}{{}}]}}", "{},".repeat(MAX_BATCH * 4));
        let Some(Messages::List(kept)) = parse_batch(many.as_bytes()).unwrap().messages else {
            panic!("a list")
        };
        assert_eq!(kept.len(), MAX_BATCH + 1);
    }

    #[test]
    fn categories() {
        use serde_json::error::Category;
        assert_eq!(parse(b"[1,2]").err().unwrap().classify(), Category::Data);
        assert_eq!(parse(b"{nope").err().unwrap().classify(), Category::Syntax);
        assert_eq!(parse(b"{\"a\":").err().unwrap().classify(), Category::Eof);
        // Malformed, whatever its first byte says.
        for body in [&b"[x"[..], b"1 x", b"\"a\" b", b"[1,"] {
            assert_ne!(parse(body).err().unwrap().classify(), Category::Data);
            assert_ne!(parse_batch(body).err().unwrap().classify(), Category::Data);
        }
        assert!(matches!(
            parse(br#"{"attachments":{"a":1}}"#).unwrap().attachments,
            Some(Attachments::Other(Value::Object(_)))
        ));
    }
}
