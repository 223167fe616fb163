//! Named choices (`--method bccp`, `method = "bccp"`): every settings enum derives clap's
//! `ValueEnum` and serde with the same snake_case names, so the command line, TOML files,
//! `params.json` and the HTTP API accept and print one spelling, and the list of valid values
//! in an error is generated, never kept by hand.

use clap::ValueEnum;

/// The names `T` accepts, in declaration order (hidden aliases left out).
pub fn names<T: ValueEnum>() -> Vec<String> {
    T::value_variants()
        .iter()
        .filter_map(ValueEnum::to_possible_value)
        .filter(|v| !v.is_hide_set())
        .map(|v| v.get_name().to_owned())
        .collect()
}

/// Parses `text` as a `T`; the error names the setting (`what`, in words), the value and the
/// valid names: `unknown method "magic"; valid: none, bccp, cleanlab, anl_ce`.
pub fn parse<T: ValueEnum>(what: &str, text: &str) -> Result<T, String> {
    T::from_str(text, false).map_err(|_| {
        format!(
            "unknown {what} {text:?}; valid: {}",
            names::<T>().join(", ")
        )
    })
}

/// Checks that a hand-written `name()` agrees with clap and serde for every variant (a test
/// helper for each enum's module).
#[cfg(test)]
pub fn assert_names_agree<T>(name: impl Fn(&T) -> &'static str)
where
    T: ValueEnum + serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    for v in T::value_variants() {
        let n = name(v);
        let clap_name = v.to_possible_value().map(|p| p.get_name().to_owned());
        assert_eq!(clap_name.as_deref(), Some(n), "clap name of {v:?}");
        assert_eq!(
            serde_json::to_value(v).ok(),
            Some(serde_json::Value::String(n.to_owned())),
            "serde name of {v:?}"
        );
        let back: T = serde_json::from_value(serde_json::Value::String(n.to_owned()))
            .unwrap_or_else(|e| panic!("serde cannot read {n:?}: {e}"));
        assert_eq!(&back, v);
        assert_eq!(parse::<T>("value", n).as_ref(), Ok(v));
    }
}
