// The page's one stylesheet, served from /style.css (the Content-Security-Policy allows no inline style).
// Mobile first: one column, large touch targets; print hides everything but backup codes' own section.
export const STYLE = `
:root { --fg: #1d2733; --muted: #55616e; --line: #c9d1da; --bg: #f5f7fa; --accent: #0b5cad; --ok: #146c2e; --err: #b00020; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; font-family: system-ui, -apple-system, "Segoe UI", "Hiragino Sans", "Noto Sans CJK JP", "Noto Sans JP", Meiryo, sans-serif;
  color: var(--fg); background: var(--bg); line-height: 1.6; font-size: 16px; }
header.site { background: #fff; border-bottom: 1px solid var(--line); }
header.site .bar { max-width: 46rem; margin: 0 auto; padding: .6rem 1rem; display: flex; flex-wrap: wrap; gap: .4rem 1rem; align-items: center; justify-content: space-between; }
header.site .title { font-weight: 700; font-size: 1.1rem; margin: 0; }
header.site .title small { display: block; font-weight: 400; font-size: .8rem; color: var(--muted); }
nav.lang a, nav.lang span { margin-left: .5rem; }
nav.lang span[aria-current] { font-weight: 700; }
nav.main { max-width: 46rem; margin: 0 auto; padding: 0 1rem .5rem; display: flex; flex-wrap: wrap; gap: .3rem 1rem; align-items: center; }
nav.main .who { color: var(--muted); font-size: .9rem; margin-right: auto; overflow-wrap: anywhere; }
nav.main a[aria-current] { font-weight: 700; text-decoration: none; color: var(--fg); }
main { max-width: 46rem; margin: 0 auto; padding: 1rem; }
h1 { font-size: 1.4rem; margin: .5rem 0 1rem; }
h2 { font-size: 1.15rem; margin: 0 0 .6rem; }
section.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 1rem; margin: 0 0 1rem; }
a { color: var(--accent); }
p { margin: 0 0 .8rem; }
.notice { border-radius: 6px; padding: .7rem .9rem; margin: 0 0 1rem; border: 1px solid; background: #fff; }
.notice.ok { border-color: var(--ok); color: var(--ok); }
.notice.error { border-color: var(--err); color: var(--err); }
.notice.info { border-color: var(--accent); }
.status { font-weight: 700; }
label { display: block; font-weight: 600; margin: .4rem 0 .2rem; }
.hint { color: var(--muted); font-size: .9rem; margin: 0 0 .4rem; }
input[type=text], input[type=password], input[type=email], select {
  width: 100%; max-width: 24rem; font: inherit; padding: .55rem .6rem; border: 1px solid #8a96a3; border-radius: 6px; background: #fff; }
input.code { max-width: 12rem; letter-spacing: .15em; font-variant-numeric: tabular-nums; }
input[aria-invalid=true] { border-color: var(--err); border-width: 2px; }
.field-error { color: var(--err); font-size: .95rem; margin: .2rem 0 .4rem; font-weight: 600; }
button { font: inherit; padding: .55rem 1.1rem; border-radius: 6px; border: 1px solid var(--accent); background: var(--accent); color: #fff; cursor: pointer; margin: .5rem .5rem 0 0; min-height: 2.75rem; }
button.secondary { background: #fff; color: var(--accent); }
button.danger { background: #fff; color: var(--err); border-color: var(--err); }
button.link { background: none; border: none; color: var(--accent); text-decoration: underline; padding: 0; min-height: 0; margin: 0; }
form { margin: 0 0 .6rem; }
form.inline { display: inline; }
fieldset { border: 1px solid var(--line); border-radius: 6px; margin: .6rem 0; padding: .3rem .8rem .8rem; }
legend { font-weight: 600; padding: 0 .3rem; }
details { margin: .6rem 0; }
summary { cursor: pointer; color: var(--accent); }
.qr svg { width: 14rem; height: 14rem; max-width: 100%; background: #fff; }
.key { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 1.1rem; letter-spacing: .08em; overflow-wrap: anywhere; background: var(--bg); padding: .3rem .5rem; border-radius: 4px; }
ol.steps { padding-left: 1.3rem; }
label.check { display: flex; gap: .5rem; align-items: center; font-weight: 400; margin: .3rem 0; min-height: 2.75rem; }
label.check input { width: 1.3rem; height: 1.3rem; margin: 0; }
p.passcode .key { display: inline-block; font-size: 1.6rem; letter-spacing: .12em; padding: .5rem .8rem; }
dl.howto dt { font-weight: 600; margin-top: .6rem; }
dl.howto dd { margin: .2rem 0 0 0; }
ul.codes { list-style: none; padding: 0; columns: 2; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 1.15rem; }
table { border-collapse: collapse; width: 100%; font-size: .95rem; }
th, td { text-align: left; padding: .45rem .4rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; }
@media (max-width: 34rem) {
  table.grants thead { display: none; }
  table.grants tr { display: block; border-bottom: 1px solid var(--line); padding: .4rem 0; }
  table.grants td { display: block; border: none; padding: .1rem 0; }
  table.grants td::before { content: attr(data-label) ": "; font-weight: 600; }
  p.passcode .key { font-size: 1.3rem; }
  ul.codes { columns: 1; }
}
@media print {
  header.site, nav, form, .noprint { display: none !important; }
  body { background: #fff; }
  section.card { border: none; }
}
`;
