//! The review gallery's HTML: one card per sample (image, given and suggested label, score,
//! one button per class), rendered by the server; a small inline script answers with a click
//! or a key and refreshes the cards from `/review/items`. No other request is made.

use std::fmt::Write;

use super::Listing;

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1em;background:#f6f6f4;color:#222}\
h1{font-size:1.3em;margin:0 0 .3em}.bar{display:flex;gap:1em;align-items:center;flex-wrap:wrap;margin-bottom:.8em}\
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:.8em}\
.card{background:#fff;border:2px solid #ddd;border-radius:8px;padding:.6em}\
.card.sel{border-color:#2b6cb0;box-shadow:0 0 0 3px #bee3f8}.card.done{background:#f0fff4;border-color:#38a169}\
.card img{width:112px;height:112px;image-rendering:pixelated;display:block;margin:0 auto .4em;background:#000}\
.meta{font-size:.85em;line-height:1.5}.given{color:#c53030}.sugg{color:#2f855a}.ver{color:#2b6cb0;font-weight:bold}\
.btns{display:flex;flex-wrap:wrap;gap:3px;margin-top:.4em}.btns button{font-size:.75em;padding:2px 4px;cursor:pointer}\
.btns button.s{outline:2px solid #2f855a}kbd{background:#eee;border:1px solid #bbb;border-radius:3px;padding:0 3px}\
#msg{min-height:1.2em;color:#2b6cb0}.help{font-size:.85em;color:#555}";

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn class_name(classes: &[String], index: i64) -> String {
    usize::try_from(index)
        .ok()
        .and_then(|i| classes.get(i))
        .map_or_else(|| format!("#{index}"), |c| c.clone())
}

/// The key that answers class `i` (1–9, then 0 for the tenth).
fn key_of(i: usize) -> Option<char> {
    match i {
        0..=8 => char::from_digit(i as u32 + 1, 10),
        9 => Some('0'),
        _ => None,
    }
}

/// The whole page.
pub(crate) fn render(l: &Listing) -> String {
    let mut h = String::with_capacity(8192 + 1024 * l.cards.len());
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <title>bccp — review labels</title><style>{STYLE}</style></head><body>\
         <h1>Review labels</h1><div class=bar><span>{} · {} flagged · page {} of {}</span>",
        esc(&l.origin),
        l.total,
        l.page,
        l.pages()
    );
    if l.page > 1 {
        let _ = write!(
            h,
            "<a id=prev href=\"/review?page={}&per_page={}\">← previous</a>",
            l.page - 1,
            l.per_page
        );
    }
    if l.page < l.pages() {
        let _ = write!(
            h,
            "<a id=next href=\"/review?page={}&per_page={}\">next →</a>",
            l.page + 1,
            l.per_page
        );
    }
    h.push_str(
        "<label>API token <input id=token type=password size=18 \
         placeholder=\"off localhost only\"></label></div>\
         <div class=help><kbd>1</kbd>–<kbd>9</kbd>, <kbd>0</kbd>: that class · \
         <kbd>Enter</kbd>: the suggested label · <kbd>←</kbd> <kbd>→</kbd>: move · \
         <kbd>PageUp</kbd> <kbd>PageDown</kbd>: pages · or click a class</div><div id=msg></div>",
    );
    if l.cards.is_empty() {
        h.push_str("<p>Nothing to review.</p>");
    }
    h.push_str("<div class=grid>");
    for (n, c) in l.cards.iter().enumerate() {
        let s = &c.sample;
        let suggested = c.entry.suggested;
        let _ = write!(
            h,
            "<div class=\"card{}{}\" id=card-{id} data-id={id} data-suggested={} tabindex=0>\
             <img alt=\"sample {id}\" src=\"/review/image/{id}\"><div class=meta>\
             <div>sample {id} · {} · {}</div>\
             <div class=given>given: {}</div><div class=sugg>suggested: {}</div>\
             <div>score: {:.3}</div><div class=ver id=ver-{id}>{}</div></div><div class=btns>",
            if n == 0 { " sel" } else { "" },
            if s.label_verified.is_some() {
                " done"
            } else {
                ""
            },
            suggested.unwrap_or(-1),
            esc(&s.source),
            s.split.as_str(),
            esc(&class_name(&l.classes, s.label_given)),
            suggested.map_or_else(|| "—".to_owned(), |i| esc(&class_name(&l.classes, i))),
            c.entry.score,
            s.label_verified.map_or_else(String::new, |v| format!(
                "verified: {}",
                esc(&class_name(&l.classes, v))
            )),
            id = s.id,
        );
        for (i, class) in l.classes.iter().enumerate() {
            let _ = write!(
                h,
                "<button data-label={i}{}>{}{}</button>",
                if suggested == Some(i as i64) {
                    " class=s"
                } else {
                    ""
                },
                key_of(i).map_or_else(String::new, |k| format!("<kbd>{k}</kbd> ")),
                esc(class)
            );
        }
        h.push_str("</div></div>");
    }
    let _ = write!(
        h,
        "</div><script>const PAGE={},PER={};{SCRIPT}</script></body></html>",
        l.page, l.per_page
    );
    h
}

/// Answers, selection and the refresh from `/review/items`.
const SCRIPT: &str = r#"
const cards=[...document.querySelectorAll('.card')];let at=0;
const tok=document.getElementById('token');tok.value=sessionStorage.getItem('bccp-token')||'';
tok.addEventListener('change',()=>sessionStorage.setItem('bccp-token',tok.value.trim()));
const msg=t=>document.getElementById('msg').textContent=t;
function select(i){if(!cards.length)return;at=Math.max(0,Math.min(cards.length-1,i));
cards.forEach((c,k)=>c.classList.toggle('sel',k===at));cards[at].scrollIntoView({block:'nearest'});}
async function refresh(){const r=await fetch(`/review/items?page=${PAGE}&per_page=${PER}`);if(!r.ok)return;
const j=await r.json();for(const it of j.items){const v=document.getElementById('ver-'+it.id);if(!v)continue;
v.textContent=it.verified?('verified: '+it.verified.name):'';
document.getElementById('card-'+it.id).classList.toggle('done',!!it.verified);}}
async function answer(card,label){if(label<0){msg('no suggestion for this sample: press a class key');return;}
const h={'Content-Type':'application/json'};const t=tok.value.trim();if(t)h['Authorization']='Bearer '+t;
const r=await fetch('/review/'+card.dataset.id,{method:'POST',headers:h,body:JSON.stringify({label})});
const j=await r.json().catch(()=>({}));
if(!r.ok){msg(`sample ${card.dataset.id}: ${j.message||r.status}`);return;}
msg(`sample ${j.id} verified as ${j.class}`);await refresh();select(cards.indexOf(card)+1);}
cards.forEach((c,k)=>{c.addEventListener('click',e=>{select(k);const b=e.target.closest('button');
if(b)answer(c,Number(b.dataset.label));});});
document.addEventListener('keydown',e=>{if(e.target===tok)return;const c=cards[at];
if(/^[0-9]$/.test(e.key)&&c){const i=e.key==='0'?9:Number(e.key)-1;
if(c.querySelector(`button[data-label="${i}"]`))answer(c,i);e.preventDefault();}
else if(e.key==='Enter'&&c){answer(c,Number(c.dataset.suggested));e.preventDefault();}
else if(e.key==='ArrowRight'||e.key==='ArrowDown'){select(at+1);e.preventDefault();}
else if(e.key==='ArrowLeft'||e.key==='ArrowUp'){select(at-1);e.preventDefault();}
else if(e.key==='PageDown'){const n=document.getElementById('next');if(n)location=n.href;}
else if(e.key==='PageUp'){const p=document.getElementById('prev');if(p)location=p.href;}});
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_escaping() {
        assert_eq!(key_of(0), Some('1'));
        assert_eq!(key_of(8), Some('9'));
        assert_eq!(key_of(9), Some('0'));
        assert_eq!(key_of(10), None);
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(class_name(&["a".into()], 0), "a");
        assert_eq!(class_name(&["a".into()], 3), "#3");
    }
}
