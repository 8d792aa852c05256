//! Value forms shared by every section: durations as strings, and numbers,
//! booleans and lists that may also come from the environment as strings.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration in whole milliseconds, written as a string: "3s", "500ms", "2m".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub i64);

impl Millis {
    pub fn as_duration(self) -> Duration {
        Duration::from_millis(self.0.max(0) as u64)
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom("expected a duration string such as \"3s\" or \"500ms\"")
        })?;
        let duration = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?}: {e} (use e.g. \"3s\", \"500ms\", \"2m\")"
            ))
        })?;
        i64::try_from(duration.as_millis())
            .map(Millis)
            .map_err(|_| serde::de::Error::custom(format!("duration {text:?} is too long")))
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(self.as_duration()).to_string())
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.as_duration()))
    }
}

/// A list written as a TOML array, or as a comma-separated string
/// (environment overrides are strings).
pub(crate) fn list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        Csv(String),
    }
    match Raw::deserialize(deserializer)
        .map_err(|_| serde::de::Error::custom("expected a list of strings"))?
    {
        Raw::List(items) => Ok(items),
        Raw::Csv(s) => Ok(s
            .split(',')
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .collect()),
    }
}

/// A boolean written as a TOML boolean or as "true"/"false".
pub(crate) fn boolean<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    native_or_string(deserializer, "true or false")
}

/// An optional unsigned number (see [`number`]).
pub(crate) fn optional_number<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + std::str::FromStr,
{
    number(deserializer).map(Some)
}

/// An unsigned number written as a TOML integer, or as a string.
pub(crate) fn number<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + std::str::FromStr,
{
    // An out-of-range value must say so, not that it is no integer.
    let what = match std::any::type_name::<T>() {
        "u32" => "a non-negative integer up to 4294967295",
        _ => "a non-negative integer",
    };
    native_or_string(deserializer, what)
}

/// A value in its TOML type, or as a string to parse (environment overrides
/// are strings); `what` names the expected value in errors.
fn native_or_string<'de, D, T>(deserializer: D, what: &str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + std::str::FromStr,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw<T> {
        Native(T),
        Str(String),
    }
    match Raw::<T>::deserialize(deserializer)
        .map_err(|_| serde::de::Error::custom(format!("expected {what}")))?
    {
        Raw::Native(value) => Ok(value),
        Raw::Str(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("expected {what}, got {s:?}"))),
    }
}
